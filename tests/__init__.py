"""Tests of robust_amo, laid out like the package (tests/attacks for robust_amo.attacks, ...)."""
