"""Shared fixtures: one torch thread, a tiny model trained on digits, shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tests.helpers import ROOT

# the same examples on every run, so CI cannot pass once and fail the next time on a new draw;
# a bug a draw finds becomes an example test (see test_config_inputs.py)
settings.register_profile("robust-amo", derandomize=True)
# fresh random draws, ten times as many: ROBUST_AMO_HYPOTHESIS=search python -m pytest ... (by
# hand, to look for new bugs; CI keeps the fixed examples)
settings.register_profile("search", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("ROBUST_AMO_HYPOTHESIS", "robust-amo"))

SHARED_DATA = Path(os.environ.get("ROBUST_AMO_SHARED_DATA",
                                  ROOT / ".." / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """One intra-op thread for the whole suite: the models are tiny, and OpenMP threads spinning
    against other processes on a 2-core machine made them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread(_single_thread):
    """For tests that ask for one thread explicitly: the session fixture already provides it."""


@pytest.fixture
def shared_data_file():
    """``shared_data_file(name)``: a file in ../shared/data; skips the test when it is absent."""

    def get(name: str) -> Path:
        p = SHARED_DATA / name
        if not p.is_file():
            pytest.skip(f"offline dataset {p} not available")
        return p

    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    """(train, test) splits of scikit-learn's digits as uint8 tensors."""
    from robust_amo.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_tiny(digits, tmp_path_factory):
    """A tiny-cnn trained with standard training on digits for a few seconds (eval mode)."""
    from robust_amo.checkpoint import load_checkpoint, model_from_checkpoint
    from robust_amo.resolve import resolve
    from robust_amo.train import train

    out = tmp_path_factory.mktemp("trained_tiny")
    cfg = resolve(None, [{
        "arch": "tiny-cnn", "dataset": "digits", "method": "standard", "epochs": 6,
        "batch_size": 64, "out": str(out), "data": {"augment": False},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "eval": {"n_examples": 100, "steps": 0},
    }])
    train(cfg)
    return model_from_checkpoint(load_checkpoint(out))
