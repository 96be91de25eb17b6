"""The `tune` command: recipes run by path (single-process and torchrun), overrides, errors, ls/cp/validate.

Every test runs the installed console script in a subprocess, as a user would type it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_tune import cli

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"
TUNE = str(Path(sys.executable).parent / "tune")


def tune(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the command must not need it
    return subprocess.run(
        [TUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    """A folder laid out like this repository: ./recipes/echo.py and ./configs/echo.yaml.

    A local `recipes/` folder is exactly what torchtune's own `tune run` cannot import single-process
    (its wheel ships a top-level `recipes` package that shadows it).
    """
    (tmp_path / "recipes").mkdir()
    (tmp_path / "configs").mkdir()
    shutil.copy(ASSETS / "recipes" / "echo_config.py", tmp_path / "recipes" / "echo.py")
    shutil.copy(ASSETS / "echo.yaml", tmp_path / "configs" / "echo.yaml")
    return tmp_path


def read_echo(out_dir: Path, rank: int = 0) -> dict:
    return json.loads((out_dir / f"echo_rank{rank}.json").read_text())


def test_tune_is_this_projects_command():
    result = tune("--help", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "higgs_tune" in result.stdout


def test_run_recipe_by_path_single_process_with_overrides(user_project: Path):
    out = user_project / "out"
    result = tune(
        "run",
        "recipes/echo",
        "--config",
        "configs/echo.yaml",
        f"output_dir={out}",
        "optimizer.lr=0.25",  # a.b=v
        "~seed",  # remove a key
        "model=torch.nn.Bilinear",  # swap a component, keep its kwargs
        cwd=user_project,
    )
    assert result.returncode == 0, result.stderr
    record = read_echo(out)
    cfg = record["config"]
    assert cfg["optimizer"] == {"_component_": "torch.optim.AdamW", "lr": 0.25}
    assert "seed" not in cfg
    assert cfg["model"] == {"_component_": "torch.nn.Bilinear", "in_features": 4, "out_features": 2}
    assert record["world_size"] == 1


def test_run_recipe_with_py_suffix_and_from_another_folder(user_project: Path, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = user_project / "out_py"
    result = tune(
        "run",
        str(user_project / "recipes" / "echo.py"),
        "--config",
        str(user_project / "configs" / "echo.yaml"),
        f"output_dir={out}",
        cwd=elsewhere,
    )
    assert result.returncode == 0, result.stderr
    assert read_echo(out)["config"]["optimizer"]["lr"] == 1.0e-3


def test_run_recipe_with_torchrun_two_processes(user_project: Path):
    out = user_project / "out_dist"
    result = tune(
        "run",
        "--nproc_per_node",
        "2",
        "recipes/echo",
        "--config",
        "configs/echo.yaml",
        f"output_dir={out}",
        "optimizer.lr=0.5",
        cwd=user_project,
    )
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        record = read_echo(out, rank)
        assert record["world_size"] == 2
        assert record["all_reduce"] == 3.0  # 1 + 2: the two ranks really talked over gloo
        assert record["config"]["optimizer"]["lr"] == 0.5


@pytest.mark.parametrize(
    "bad_args, message",
    [
        (["--config", "configs/echo.yaml", "optimizer.lr"], "must look like key=value"),
        (["--config", "configs/missing.yaml"], "config not found: configs/missing.yaml"),
        (["--config", "configs/echo.yaml", "~nonexistent.key"], "Could not find key nonexistent.key"),
        (["--config", "configs/echo.yaml", "--lr", "3"], "unknown flag '--lr'"),
        ([], "'--config CONFIG' argument is required"),
    ],
)
def test_bad_command_lines_give_one_line_errors(user_project: Path, bad_args, message):
    result = tune("run", "recipes/echo", *bad_args, cwd=user_project)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tune: error:") and message in lines[0], lines[0]


def test_missing_recipe_is_a_one_line_error(user_project: Path):
    result = tune("run", "recipes/nope", "--config", "configs/echo.yaml", cwd=user_project)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()]
        and "recipe not found: recipes/nope" in result.stderr
    )


def test_ls_lists_project_recipes_and_configs():
    result = tune("ls", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "higgs_finetune" in result.stdout
    for config in ("cpu_tiny", "a100", "h100"):
        assert config in result.stdout


def test_cp_copies_recipe_and_config_for_modification(tmp_path: Path):
    assert tune("cp", "higgs_finetune", str(tmp_path), cwd=tmp_path).returncode == 0
    assert tune("cp", "cpu_tiny", str(tmp_path / "my_config.yaml"), cwd=tmp_path).returncode == 0
    assert (tmp_path / "higgs_finetune.py").read_text() == (
        REPO / "recipes" / "higgs_finetune.py"
    ).read_text()
    assert (tmp_path / "my_config.yaml").read_text() == (REPO / "configs" / "cpu_tiny.yaml").read_text()
    again = tune("cp", "cpu_tiny", str(tmp_path / "my_config.yaml"), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def tune_in_process(*args: str, cwd: Path, capsys) -> tuple[int, str, str]:
    """The same command line through `higgs_tune.cli.main` (no interpreter start-up per case)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        code = cli.main(list(args))
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_validate_passes_on_every_shipped_config(config: str, capsys):
    code, out, err = tune_in_process("validate", f"configs/{config}", cwd=REPO, capsys=capsys)
    assert code == 0, err
    assert "well-formed" in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer=torch.optim.NoSuchOptimizer", "unknown component path 'torch.optim.NoSuchOptimizer'"),
        ("optimizer.no_such_kwarg=1", "got an unexpected keyword argument 'no_such_kwarg'"),
        ("seq_len=abc", "seq_len: expected int"),
        ("~seed", "missing required key 'seed'"),
        ("~output_dir", "Interpolation key 'output_dir' not found"),
        ("batch_size=0", "batch_size must be positive"),
        ("on_nonfinite=ignore", "on_nonfinite must be one of ('skip', 'stop')"),
        ("fsdp.param_dtype=fp16", "fsdp.param_dtype must be one of ['bf16', 'fp32'] or null"),
        ("fsdp.no_such_option=1", "got an unexpected keyword argument 'no_such_option'"),
        ("fsdp.cpu_offload=true", "fsdp.cpu_offload=true needs device=cuda"),
        (
            "generation.sampling={greedy: false, temperature: 0}",
            "generation.sampling: temperature must be > 0",
        ),
        ("generation.sampling={temp: 1}", "generation.sampling: SamplingConfig got an unexpected keyword"),
        ("generation.every_n_steps=0", "generation.every_n_steps must be a positive int or null, got 0"),
        ("generation.batch_size=0", "generation.batch_size must be a positive int or null, got 0"),
        ("generation.sampling={ras_win_len: 0}", "generation.sampling: ras_win_len must be >= 1 or None"),
        (
            "generation.audio_decoder=/no/such/tokenizer",
            "generation.audio_decoder: no config.json or model.pth in /no/such/tokenizer",
        ),
    ],
)
def test_validate_reports_config_errors_on_one_line(override: str, message: str, capsys):
    code, out, err = tune_in_process("validate", "configs/cpu_tiny.yaml", override, cwd=REPO, capsys=capsys)
    assert code == 2, out
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err


def test_validate_as_a_command_line(tmp_path: Path):
    """One subprocess run of `tune validate`, as typed."""
    result = tune("validate", "configs/cpu_tiny.yaml", "seq_len=abc", cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "tune: error: seq_len: expected int, got str 'abc'"
