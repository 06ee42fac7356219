"""Tests of the command line (robust_amo.cli)."""
