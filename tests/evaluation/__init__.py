"""Tests of robust_amo.evaluation."""
