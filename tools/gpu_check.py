"""The GPU checks in one go: step-mode numerics on CUDA, then the 3B benchmark; prints a markdown block
for docs/benchmarks.md.

    python tools/gpu_check.py                      # numerics + 3B benchmark (compile and cudagraph)
    python tools/gpu_check.py --skip-bench         # numerics only (about a minute)
    python tools/gpu_check.py --device cpu --skip-bench   # the eager/compile part, to test the script

1. Numerics: the tiny model, 5 optimizer steps with gradient accumulation 2 on the same synthetic packed
   batches, in every mode, fp32: compile, then cudagraph as the eager fallback (no capture, first: a
   failed capture can leave the CUDA context unusable), with eager fused AdamW, with the optimizer
   captured, with the model eager inside the graph, with the non-finite check the recipe uses, and
   switched to after 2 eager steps with the optimizer captured (a resumed run: its optimizer state must
   survive the warm-up). Reports the largest loss and parameter difference to eager.
2. Host syncs: eager, compile and cudagraph steps (fused AdamW, the recipe's non-finite check) run
   under ``torch.cuda.set_sync_debug_mode("error")`` after their first step: any synchronising call
   inside the step raises. Also reports whether a later step compiled a new graph.
3. Benchmark: ``tools/bench.py --config 3b --device cuda``: the reference step once, then our ``compile``
   and ``cudagraph`` modes (bf16): tokens/s, step time, peak memory, MFU, ratio to the reference.
3. Consumer configs: ``configs/rtx24gb_lora.yaml`` and ``configs/rtx16gb_qlora.yaml`` run by the
   recipe's own class for 20 steps on the 3B architecture with random weights (synthetic data, tiny
   tokenizer ids): peak ``torch.cuda.max_memory_allocated`` of the set-up and of the 20 steps, next to
   ``tools/memory_estimate.py``'s figure and the card each config is made for; then the merged export.
4. Generation (``tools/bench_generation.py``, ``--skip-generation`` to leave it out): the tiny model in
   fp32, cache-free reference vs KV-cached eager vs compiled + CUDA-graph decode step (same codes?); then
   3B in bf16, a 300-column answer to a ~200-position prompt: columns/s at batch 1 and 8, real-time factor
   at 25 frames/s.

Every section is printed (and appended to ``--out``, by default ``$OUT/gpu_check.md`` when ``$OUT`` is
set) as soon as it is done, so a run cut short by a time limit still reports what it finished.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

NUM_STEPS, ACCUMULATION = 5, 2


def numerics(device: torch.device, data_dir: Path) -> list[str]:
    """Markdown table rows: mode, max |loss - eager| relative, max |param - eager|."""
    import bench

    from higgs_tune.loss import AlignedLoss
    from higgs_tune.training.optim import build_optimizer
    from higgs_tune.training.step import build_train_step

    cfg = bench.CONFIGS["small"]
    args = bench.model_args(cfg)
    dataset, _ = bench.build_rows(cfg, data_dir, args)
    steps = bench.step_rows(dataset, NUM_STEPS * ACCUMULATION, cfg.batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in bench.our_batches(dataset, steps)]

    def train(mode: str, eager_steps_first: int = 0, **options):
        from higgs_tune.models.higgs_audio.builders import build_model

        torch.manual_seed(0)
        model = build_model(args, device=device, dtype=torch.float32)
        optimizer = build_optimizer(
            model.parameters(),
            lr=1e-3,
            betas=(0.9, 0.95),
            weight_decay=0.01,
            **bench.optimizer_kind(mode, device, options),
        )
        from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, 2, NUM_STEPS)
        loss_fn = AlignedLoss()
        step = build_train_step("eager", model, loss_fn, optimizer, scheduler, 1.0)
        losses = []
        for i in range(NUM_STEPS):
            if i == eager_steps_first:
                step = build_train_step(mode, model, loss_fn, optimizer, scheduler, 1.0, **options)
            losses.append(step(batches[i * ACCUMULATION : (i + 1) * ACCUMULATION])["loss"].item())
        return torch.tensor(losses), [p.detach().float().cpu() for p in model.parameters()]

    reference_losses, reference_params = train("eager")
    rows = [f"| eager | {', '.join(f'{x:.4f}' for x in reference_losses.tolist())} | 0 | 0 |"]
    variants = [("compile", {})]
    if device.type == "cuda":
        variants += [
            ("cudagraph", {"capture": False}),
            ("cudagraph", {"capture_optimizer": False}),
            ("cudagraph", {"capture_optimizer": True}),
            ("cudagraph", {"compile_model": False}),
            ("cudagraph", {"skip_nonfinite": True}),
            ("cudagraph", {"capture_optimizer": True, "eager_steps_first": 2}),
        ]
    for mode, options in variants:
        name = mode + (f" {options}" if options else "")
        try:
            losses, params = train(mode, **options)
            loss_diff = ((losses - reference_losses).abs() / reference_losses.abs()).max().item()
            param_diff = max((p - q).abs().max().item() for p, q in zip(params, reference_params))
            rows.append(
                f"| {name} | {', '.join(f'{x:.4f}' for x in losses.tolist())} | {loss_diff:.2e} | {param_diff:.2e} |"
            )
        except Exception as error:  # report and go on: the other modes' numbers are still wanted
            traceback.print_exc()
            rows.append(f"| {name} | FAILED: {type(error).__name__}: {str(error)[:200]} | | |")
        print(rows[-1], file=sys.stderr, flush=True)
        torch._dynamo.reset()
    return rows


def host_syncs(device: torch.device, data_dir: Path) -> list[str]:
    """Markdown table rows: mode, whether 2 steps passed under set_sync_debug_mode("error"), graphs
    compiled after the first step."""
    import bench
    from torch._dynamo.utils import counters

    from higgs_tune.loss import AlignedLoss
    from higgs_tune.models.higgs_audio.builders import build_model
    from higgs_tune.training.optim import build_optimizer
    from higgs_tune.training.step import build_train_step

    cfg = bench.CONFIGS["small"]
    args = bench.model_args(cfg)
    dataset, _ = bench.build_rows(cfg, data_dir, args)
    steps = bench.step_rows(dataset, 3 * ACCUMULATION, cfg.batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in bench.our_batches(dataset, steps)]
    rows = []
    for mode in ("eager", "compile", "cudagraph"):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = build_model(args, device=device, dtype=torch.float32)
        optimizer = build_optimizer(model.parameters(), lr=1e-3)  # fused AdamW
        step = build_train_step(mode, model, AlignedLoss(), optimizer, None, 1.0, skip_nonfinite=True)
        try:
            step(batches[:ACCUMULATION])
            graphs = counters["stats"]["unique_graphs"]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for i in (1, 2):
                    metrics = step(batches[i * ACCUMULATION : (i + 1) * ACCUMULATION])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            new_graphs = counters["stats"]["unique_graphs"] - graphs
            rows.append(f"| {mode} | passed (loss {metrics['loss'].item():.4f}) | {new_graphs} |")
        except Exception as error:
            traceback.print_exc()
            rows.append(f"| {mode} | FAILED: {type(error).__name__}: {str(error)[:200]} | |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


class Report:
    """Markdown lines, printed and appended to ``path`` (if any) as each section finishes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def add(self, *lines: str) -> None:
        text = "\n".join(lines) + "\n"
        print(text, end="", flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(text)


def free_device_memory(device: torch.device) -> None:
    """Drop the previous side's compiled graphs, model and optimizer before the next one starts."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        allocated = torch.cuda.memory_allocated(device) / 2**30
        print(f"CUDA memory still allocated before the next side: {allocated:.2f} GiB", file=sys.stderr)
        if allocated > 1.0:
            raise RuntimeError(f"{allocated:.2f} GiB still allocated from the previous side")


def benchmark(report: Report, cli, data_dir: Path) -> None:
    """The reference step once, then each of our modes; one table row per side as it finishes."""
    import bench

    common = ["--config", cli.bench_config, "--device", cli.device, "--steps", str(cli.steps)]
    common += ["--warmup", str(cli.warmup)]
    report.add(
        "",
        f"### Benchmark `{cli.bench_config}` ({bench.CONFIGS[cli.bench_config]})",
        "",
        f"`python tools/bench.py {' '.join(common)} --side reference` (then `--side ours --mode M`)",
        "",
        "| side | tokens/s | step time (s) | peak CUDA memory (GiB) | MFU | tokens/s vs reference |",
        "|---|---|---|---|---|---|",
    )
    reference = None
    for side, mode in (("reference", None), ("ours", "compile"), ("ours", "cudagraph")):
        name = side if mode is None else f"ours `{mode}`"
        try:
            free_device_memory(torch.device(cli.device))
            command = [*common, "--side", side, "--data-dir", str(data_dir)]
            result = bench.main(command + (["--mode", mode] if mode else []))[side]
        except Exception as error:  # report and go on: the other sides' numbers are still wanted
            traceback.print_exc()
            report.add(f"| {name} | FAILED: {type(error).__name__}: {str(error)[:200]} | | | | |")
            continue
        reference = result if mode is None else reference
        memory = result.get("peak_mem_gib", result.get("peak_rss_gib", float("nan")))
        mfu = f"{100 * result['mfu']:.1f}%" if "mfu" in result else "n/a"
        ratio = f"{result['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "n/a"
        report.add(
            f"| {name} | {result['tokens_per_s']:.1f} | {result['step_s']:.3f} | {memory:.2f} | {mfu} | {ratio} |"
        )


CONSUMER_CONFIGS = {"rtx24gb_lora": "rtx24gb", "rtx16gb_qlora": "rtx16gb"}  # config -> its card
# The 3B architecture with the tiny tokenizer's special ids (no real tokenizer needed): bench.py's way.
ARCH_3B = dict(
    vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
    intermediate_size=8192, audio_ffn_hidden_size=3072, audio_ffn_intermediate_size=8192,
)  # fmt: skip


def consumer_config_memory(report: Report, cli, data_dir: Path) -> None:
    """Each consumer config, 3B with random weights (``--consumer-size tiny``: the tiny model, to test
    this section on CPU), run by the recipe class: set-up peak, then the peak of ``--consumer-steps``
    steps (gradient accumulation ``--consumer-accumulation``: the peak does not depend on it, gradients
    accumulate in place)."""
    import importlib.util

    import bench

    from higgs_tune.config import load_config

    estimate_tool = bench.load_tool("memory_estimate")
    spec = importlib.util.spec_from_file_location(
        "higgs_finetune_recipe", REPO / "recipes" / "higgs_finetune.py"
    )
    recipe_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_module)
    bench.load_tool("make_synthetic").make_synthetic(data_dir, num_samples=600, num_val=1, seed=0)
    cuda = cli.device == "cuda"
    report.add(
        "",
        f"### Consumer configs, {cli.consumer_size} model, random weights, {cli.consumer_steps} steps "
        f"(`python tools/gpu_check.py`)",
        "",
        "| config | card | set-up peak (GiB) | training peak (GiB) | estimate (GiB) | s/step | export (s) |",
        "|---|---|---|---|---|---|---|",
    )
    for name, card in CONSUMER_CONFIGS.items():
        overrides = [
            f"output_dir={data_dir / name}",
            f"device={cli.device}",
            "checkpointer.checkpoint_dir=null",
            "model=higgs_tune.models.higgs_audio.builders.higgs_audio_tiny",
            f"tokenizer.path={REPO / 'higgs_tune' / 'assets' / 'tiny_tokenizer' / 'tokenizer.json'}",
            f"dataset.path={data_dir / 'train.jsonl'}",
            f"max_steps={cli.consumer_steps}",
            "epochs=1000",
            f"gradient_accumulation_steps={cli.consumer_accumulation}",
            "save_every_n_steps=100000",
            "eval_every_n_steps=null",
            "log_every_n_steps=1",
        ]
        if cli.consumer_size == "3b":
            overrides += [f"+model.{key}={value}" for key, value in ARCH_3B.items()]
        else:  # CPU test of this section: short rows, eager, NF4 scales in blocks the tiny model has
            overrides += ["seq_len=256", "compile=false", "num_workers=0"]
            overrides += [f"dataset.{k}_capacity={v}" for k, v in (("text_ffn", 128), ("audio_ffn", 256))]
            overrides += [
                f"dataset.{k}_capacity={v}" for k, v in (("text_target", 64), ("audio_target", 256))
            ]
            if "qlora" in name:
                overrides.append("finetune.quantize_base.scaler_block_size=16")
        try:
            free_device_memory(torch.device(cli.device))
            cfg = load_config(REPO / "configs" / f"{name}.yaml", overrides)
            estimate = estimate_tool.estimate(cfg)["peak_allocated"] / 2**30
            recipe = recipe_module.HiggsFinetuneRecipe(cfg)
            recipe.setup()
            setup_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            recipe.train()
            seconds = (time.perf_counter() - start) / cli.consumer_steps
            train_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            start = time.perf_counter()
            recipe.save_export(recipe.full_state_dict())  # merged bf16 export (QLoRA: dequantized bases)
            export_seconds = time.perf_counter() - start
            recipe.cleanup()
            del recipe
            shutil.rmtree(data_dir / name)  # 11 GB of export per config at 3B
        except Exception as error:  # report and go on: the other config's numbers are still wanted
            traceback.print_exc()
            report.add(f"| {name} | {card} | FAILED: {type(error).__name__}: {str(error)[:200]} | | | | |")
            continue
        report.add(
            f"| {name} | {card} | {setup_peak:.2f} | {train_peak:.2f} | {estimate:.2f} | {seconds:.2f} "
            f"| {export_seconds:.0f} |"
        )


def generation(report: Report) -> None:
    """tools/bench_generation.py on CUDA: tiny fp32 (all sides, same codes?), then 3B bf16 at batch 1 and 8."""
    import bench_generation

    report.add(
        "",
        "### Generation (`python tools/bench_generation.py --device cuda ...`, 300 columns after ~200 positions)",
        "",
        "| config | dtype | side | batch | columns/s | columns/s per prompt | real-time factor | vs reference | same codes |",
        "|---|---|---|---|---|---|---|---|---|",
    )
    runs = [
        ["--config", "small", "--columns", "40", "--batch-sizes", "1", "4"],
        ["--config", "3b", "--dtype", "bf16", "--batch-sizes", "1"],
        ["--config", "3b", "--dtype", "bf16", "--batch-sizes", "8", "--sides", "cached", "compiled"],
    ]
    for run in runs:
        try:
            free_device_memory(torch.device("cuda"))
            results = bench_generation.main(["--device", "cuda", *run])
        except Exception as error:  # report and go on: the other runs' numbers are still wanted
            traceback.print_exc()
            report.add(
                f"| {' '.join(run)} | FAILED: {type(error).__name__}: {str(error)[:200]} | | | | | | | |"
            )
            continue
        for r in results:
            report.add(
                f"| {r['config']} | {r['dtype']} | {r['side']} | {r['batch_size']} | {r['columns_per_s']} | "
                f"{r['columns_per_s_per_prompt']} | {r['real_time_factor']} | {r['speedup_vs_reference']} | "
                f"{r['same_codes_as_reference']} |"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--bench-config", default="3b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also append the report here")
    parser.add_argument("--skip-consumer", action="store_true", help="skip the consumer-config memory runs")
    parser.add_argument("--only-consumer", action="store_true", help="only the consumer-config memory runs")
    parser.add_argument("--consumer-size", choices=("3b", "tiny"), default="3b")
    parser.add_argument("--consumer-steps", type=int, default=20)
    parser.add_argument("--consumer-accumulation", type=int, default=1)
    cli = parser.parse_args(argv)
    device = torch.device(cli.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check.py: CUDA is not available on this machine (use --device cpu to test the script)"
        )
    out_path = cli.out or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else None)
    report = Report(out_path)
    report.add("## GPU results", "")
    if device.type == "cuda":
        report.add(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if cli.only_consumer:
            consumer_config_memory(report, cli, Path(tmp) / "consumer")
            return
        start = time.perf_counter()
        rows = numerics(device, Path(tmp) / "numerics")
        report.add(
            "",
            f"### Step-mode numerics (tiny model, fp32, {NUM_STEPS} steps x accumulation {ACCUMULATION}, "
            "`python tools/gpu_check.py`)",
            "",
            "| mode | losses | max rel. loss diff to eager | max abs. param diff to eager |",
            "|---|---|---|---|",
            *rows,
        )
        print(f"numerics took {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if device.type == "cuda":
            report.add(
                "",
                '### Host syncs inside the step (`torch.cuda.set_sync_debug_mode("error")`, steps 2-3)',
                "",
                "| mode | result | graphs compiled after step 1 |",
                "|---|---|---|",
                *host_syncs(device, Path(tmp) / "numerics"),
            )
        if not cli.skip_bench:
            benchmark(report, cli, Path(tmp) / "bench")
        if not cli.skip_consumer:
            consumer_config_memory(report, cli, Path(tmp) / "consumer")
        if not cli.skip_generation and device.type == "cuda":
            generation(report)


if __name__ == "__main__":
    main()
