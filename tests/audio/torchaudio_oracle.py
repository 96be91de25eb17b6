"""torchaudio's own ``functional.resample``, run from its released source: the oracle of the resampling
tests and the ``torchaudio.functional.resample`` that Boson's ``encode`` calls in the encoder tests.

torchaudio cannot be installed next to torch 2.13 (its wheels pin their torch), but its resampler is
plain torch. The README's test command downloads the wheel without installing it
(``pip download --no-deps torchaudio==2.11.0 -d .ci-cache/wheels``); this module reads
``torchaudio/functional/functional.py`` from it and executes, unchanged, the three function definitions
``resample``, ``_get_sinc_resample_kernel`` and ``_apply_sinc_resample_kernel`` with the names they use
(``torch``, ``math``, ``warnings``, ``Optional``, ``Tensor`` and the module constant ``_CPU``). Nothing
is re-typed: a change in torchaudio's formula shows up as a failing test here.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[2]
WHEEL_DIR = Path(os.environ.get("HIGGS_TUNE_WHEEL_DIR", REPO / ".ci-cache" / "wheels"))
FUNCTIONS = ("resample", "_get_sinc_resample_kernel", "_apply_sinc_resample_kernel")


@functools.cache
def torchaudio_functions() -> dict[str, object]:
    """The three functions, defined from the wheel's source; a clear error when the wheel is absent."""
    wheels = sorted(WHEEL_DIR.glob("torchaudio-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            f"no torchaudio wheel in {WHEEL_DIR}: run `pip download --no-deps torchaudio==2.11.0 -d "
            f"{WHEEL_DIR}` (README, 'Run the tests'); the wheel is read, not installed"
        )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        source = wheel.read("torchaudio/functional/functional.py").decode()
    tree = ast.parse(source)
    definitions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS]
    constant = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_CPU" for t in node.targets)
    ]
    if len(definitions) != len(FUNCTIONS) or len(constant) != 1:
        raise RuntimeError(f"{wheels[-1]}: functional.py no longer defines {FUNCTIONS} and _CPU")
    namespace: dict[str, object] = {
        "torch": torch,
        "math": math,
        "warnings": warnings,
        "Optional": Optional,
        "Tensor": Tensor,
    }
    module = ast.Module(body=[*constant, *definitions], type_ignores=[])
    exec(compile(module, f"{wheels[-1].name}/torchaudio/functional/functional.py", "exec"), namespace)
    return {name: namespace[name] for name in FUNCTIONS}


def resample(waveform: Tensor, orig_freq: int, new_freq: int, **kwargs) -> Tensor:
    """``torchaudio.functional.resample`` itself (from the wheel's source)."""
    return torchaudio_functions()["resample"](waveform, orig_freq, new_freq, **kwargs)
