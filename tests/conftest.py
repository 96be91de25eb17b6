"""Shared test set-up: keep torch single-threaded-ish and deterministic on the 2-core CI machine."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# tests/transformers_port/ needs transformers >= 5.3 (transformers' HiggsAudioV2 port) and runs in the
# second test virtualenv (README, "Run the tests"); the main one has Boson's transformers < 4.47.
PORT_TESTS = Path(__file__).parent / "transformers_port"


def _has_transformers_port() -> bool:
    try:
        import transformers
    except ImportError:
        return False
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return (major, minor) >= (5, 3)


def pytest_ignore_collect(collection_path, config):
    inside = collection_path == PORT_TESTS or PORT_TESTS in collection_path.parents
    if inside and not _has_transformers_port():
        return True
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
