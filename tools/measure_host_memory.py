"""Measure a training run's host memory: the resident peak of each phase (load, step, checkpoint,
export, ...), its wall time, and the disk taken by each checkpoint and by the export.

    python tools/measure_host_memory.py --config configs/a100_lora.yaml device=cpu max_steps=2 ...
    python tools/measure_host_memory.py --make-random-base /data/random3b     # a 3B base to measure with

The first form runs ``recipes/higgs_finetune.py`` in this process exactly as ``tune run`` does (same
config, same overrides), and times and measures the recipe's methods as they run: ``setup`` (load:
tokenizer, weights, data, optimizer), every call of the train step (step), ``save_checkpoint``
(checkpoint), ``validate``, ``full_state_dict`` (gather, FSDP runs), ``generate_held_out`` and
``save_export`` (export). A phase's peak is Linux's resident high-water mark over the phase: the mark is
reset to the current resident size when the phase starts (``/proc/self/clear_refs``) and read from
``VmHWM`` when it ends; the resident size counts file pages a process maps (a memory-mapped base) as
well as its own memory, and the split at the phase's end is reported too. One process only (no
torchrun). Prints a table and one JSON line (``--json`` also writes it to a file).

The second form writes a checkpoint directory with the released 3B architecture and random weights
(normal(0, 0.02), norms 1, bf16, in Boson's sharded layout, one tensor in memory at a time) and a
tokenizer with Llama-3's id layout (the tiny test tokenizer's BPE, padded with unused ids to 128000,
then the 256 special tokens): ``checkpointer.checkpoint_dir`` and ``tokenizer.path`` for a measurement
at the real size without the released weights.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"
GIB = 2**30
# recipe method -> phase name
PHASES = {
    "setup": "load",
    "save_checkpoint": "checkpoint",
    "validate": "validate",
    "full_state_dict": "gather",
    "generate_held_out": "generate",
    "save_export": "export",
}


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name} (Linux only)")


def _reset_peak() -> None:
    """Set the resident high-water mark (VmHWM) to the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


@dataclass
class PhaseStats:
    calls: int = 0
    peak_gib: float = 0.0
    wall_s: list[float] = field(default_factory=list)
    anon_gib_at_end: float = 0.0
    file_gib_at_end: float = 0.0


class HostMemoryMeter:
    """Per-phase resident peaks and wall times; phases do not nest."""

    def __init__(self) -> None:
        _reset_peak()  # fails here, before any work, where the kernel does not allow it
        self.phases: dict[str, PhaseStats] = {}
        self.between_gib = 0.0  # the highest mark outside every phase

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.between_gib = max(self.between_gib, _status_kib("VmHWM") / 2**20)
        _reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - start
            stats = self.phases.setdefault(name, PhaseStats())
            stats.calls += 1
            stats.wall_s.append(wall)
            stats.peak_gib = max(stats.peak_gib, _status_kib("VmHWM") / 2**20)
            stats.anon_gib_at_end = _status_kib("RssAnon") / 2**20
            stats.file_gib_at_end = _status_kib("RssFile") / 2**20
            _reset_peak()

    def wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)

        return measured


def load_recipe_module() -> Any:
    spec = importlib.util.spec_from_file_location("higgs_finetune", REPO / "recipes" / "higgs_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instrument(recipe_class: type, meter: HostMemoryMeter) -> None:
    """Measure the recipe's phases (its methods, and the train step that ``setup`` builds)."""
    for method, phase in PHASES.items():
        setattr(recipe_class, method, meter.wrap(phase, getattr(recipe_class, method)))
    measured_setup = recipe_class.setup

    def setup(self: Any) -> None:
        measured_setup(self)
        self.train_step = meter.wrap("step", self.train_step)

    recipe_class.setup = setup


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def measure(config: str, overrides: list[str]) -> dict[str, Any]:
    from higgs_tune.config import load_config

    cfg = load_config(config, overrides)  # one-line errors before the run starts
    module = load_recipe_module()
    meter = HostMemoryMeter()
    instrument(module.HiggsFinetuneRecipe, meter)
    argv = sys.argv
    sys.argv = ["recipes/higgs_finetune.py", "--config", config, *overrides]
    try:
        module.recipe_main()  # torchtune's config.parse ends with sys.exit(recipe_main(cfg))
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise
    finally:
        sys.argv = argv
    output_dir = Path(cfg.output_dir)
    from higgs_tune.training.checkpointing import checkpoint_dirs

    checkpoints = checkpoint_dirs(output_dir / "checkpoints")
    base = cfg.checkpointer.checkpoint_dir
    base_bytes = sum(p.stat().st_size for p in Path(base).glob("*.safetensors")) if base else 0
    report: dict[str, Any] = {
        "config": config,
        "overrides": overrides,
        "base_gib": base_bytes / GIB,
        "phases": {
            name: {
                "calls": s.calls,
                "peak_rss_gib": round(s.peak_gib, 3),
                "wall_s": [round(w, 2) for w in s.wall_s],
                "rss_anon_gib_at_end": round(s.anon_gib_at_end, 3),
                "rss_file_gib_at_end": round(s.file_gib_at_end, 3),
            }
            for name, s in meter.phases.items()
        },
        "peak_rss_gib": round(max([meter.between_gib, *(s.peak_gib for s in meter.phases.values())]), 3),
        "checkpoint_bytes": {p.name: folder_bytes(p) for p in checkpoints},
        "export_bytes": folder_bytes(output_dir / "hf"),
        "adapter_bytes": folder_bytes(output_dir / "adapter"),
    }
    if base_bytes:
        report["peak_over_base"] = round(report["peak_rss_gib"] / report["base_gib"], 3)
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"{'phase':<12}{'calls':>6}{'peak RSS GiB':>14}{'anon/file GiB at end':>22}  wall s")
    for name, s in report["phases"].items():
        split = f"{s['rss_anon_gib_at_end']:.2f} / {s['rss_file_gib_at_end']:.2f}"
        walls = ", ".join(f"{w:.1f}" for w in s["wall_s"][:6]) + (" ..." if len(s["wall_s"]) > 6 else "")
        print(f"{name:<12}{s['calls']:>6}{s['peak_rss_gib']:>14.2f}{split:>22}  {walls}")
    line = f"peak RSS {report['peak_rss_gib']:.2f} GiB"
    if "peak_over_base" in report:
        line += f" = {report['peak_over_base']:.2f}x the base's {report['base_gib']:.2f} GiB"
    print(line)
    for name, size in report["checkpoint_bytes"].items():
        print(f"checkpoint {name}: {size / 2**20:.1f} MiB")
    print(
        f"export: {report['export_bytes'] / GIB:.2f} GiB; adapter: {report['adapter_bytes'] / 2**20:.1f} MiB"
    )


# ------------------------------------------------------------------------------ a random-weights base
def write_random_base(out_dir: Path, seed: int = 0) -> None:
    """The released 3B architecture with random bf16 weights, and a tokenizer with its id layout."""
    from higgs_tune.models.higgs_audio.builders import higgs_audio_3b
    from higgs_tune.models.higgs_audio.checkpoint import save_hf_checkpoint
    from higgs_tune.models.safetensors_writer import LazyTensor

    model = higgs_audio_3b(device="meta", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)

    def random_tensor(name: str, shape: torch.Size) -> torch.Tensor:
        if "norm" in name:
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(torch.bfloat16)

    tensors = {
        name: LazyTensor(p.shape, torch.bfloat16, functools.partial(random_tensor, name, p.shape))
        for name, p in model.state_dict().items()
    }
    save_hf_checkpoint(tensors, model.args, out_dir)
    write_llama3_layout_tokenizer(out_dir, bpe_vocab_size=128000)
    print(f"wrote {out_dir}: {sum(t.nbytes for t in tensors.values()) / GIB:.2f} GiB of random bf16 weights")


def write_llama3_layout_tokenizer(out_dir: Path, bpe_vocab_size: int) -> None:
    """The tiny tokenizer with its BPE vocabulary padded by never-produced ids to ``bpe_vocab_size``,
    so that the 256 special tokens get Llama-3's ids (``bpe_vocab_size + i``)."""
    tokenizer = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    shift = bpe_vocab_size - len(vocab)
    vocab.update({f"<unused_padding_{i}>": len(vocab) + i for i in range(shift)})
    for token in tokenizer["added_tokens"]:
        token["id"] += shift
    for special in tokenizer["post_processor"]["special_tokens"].values():
        special["ids"] = [i + shift for i in special["ids"]]
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = (TINY_TOKENIZER / "tokenizer_config.json").read_text()
    (out_dir / "tokenizer_config.json").write_text(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the recipe config to run and measure")
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    parser.add_argument("--make-random-base", type=Path, metavar="DIR", help="write a random 3B base to DIR")
    args, overrides = parser.parse_known_args(argv)
    if args.make_random_base is not None:
        write_random_base(args.make_random_base)
        return
    if args.config is None:
        parser.error("--config (or --make-random-base) is required")
    report = measure(args.config, overrides)
    print_table(report)
    line = json.dumps(report)
    print(line)
    if args.json is not None:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
