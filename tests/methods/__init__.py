"""Tests of robust_amo.methods."""
