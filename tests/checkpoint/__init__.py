"""Tests of robust_amo.checkpoint."""
