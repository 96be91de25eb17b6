"""Shared test set-up: keep torch single-threaded-ish and deterministic on the 2-core CI machine."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
