"""Tests of robust_amo.integrations."""
