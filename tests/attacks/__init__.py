"""Tests of robust_amo.attacks."""
