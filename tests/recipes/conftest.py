from __future__ import annotations

from pathlib import Path

import pytest
from recipe_testing import make_synthetic


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """The synthetic TTS set (240 training samples) shared by the recipe tests."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))
