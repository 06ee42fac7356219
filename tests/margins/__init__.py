"""Tests of robust_amo.margins."""
