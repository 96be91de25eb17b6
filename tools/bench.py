"""Benchmark our training step against the reference step public trainers run, on the same batches.

    python tools/bench.py --small                       # CI smoke run (< 1 minute, numbers not meaningful)
    python tools/bench.py --config cpu3b                # CPU, proportioned like the 3B model
    python tools/bench.py --config 3b --device cuda     # the released 3B architecture on a GPU

Both sides train the SAME architecture (one HF ``config.json`` dict builds both models) on the SAME
samples, step for step:

* ours: the packed static batch (``higgs_tune.data``), :class:`higgs_tune.models.higgs_audio.model.
  HiggsAudioModel`, the aligned loss, AdamW (``--our-optimizer``: torch AdamW, fused, torchao's 8-bit,
  or bf16 moments), in the step mode ``--mode`` (``compile`` by default; ``optimizer_in_backward``:
  per-parameter AdamW stepped inside the backward, decoder blocks and loss compiled, no clipping);
* reference: Boson's ``HiggsAudioModel`` forward (eager, SDPA attention) on Boson's collated inputs of
  the very samples packed into our step's rows (``prepare_chatml_sample`` + ``HiggsAudioSampleCollator``,
  padded to the longest sample), Boson's reference loss (``higgs_tune.loss.reference.reference_loss``,
  Boson's formula) on its outputs, ``torch.optim.AdamW``.

Reported per side: tokens/s (non-padding positions of the step / median step time), the median step
time over ``--steps`` steps after ``--warmup`` steps, peak memory, and on CUDA the MFU (PaLM: 6·N·tokens
plus attention 12·layers·hidden·seq_len·tokens, N = matmul parameters one token uses: attention, ONE of
the two FFNs, the text and audio heads). On CPU both sides run in ONE process with their steps interleaved (a CPU
shared with other work slows both alike) for the times; peak memory comes from one fresh subprocess per
side (``getrusage(RUSAGE_SELF).ru_maxrss`` after one warm-up and one timed step, so one side's
allocations never count for the other). On CUDA the sides run one after the other in one process (two
3B models do not fit one card together), memory from ``torch.cuda.max_memory_allocated`` after a reset.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"


@dataclass(frozen=True)
class BenchConfig:
    """Architecture and batch shape of one benchmark configuration."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    text_ffn_capacity: int | None  # per-row capacities (higgs_tune/data/batch.py); None = seq_len
    audio_ffn_capacity: int | None
    text_target_capacity: int
    audio_target_capacity: int
    num_samples: int  # synthetic samples generated (enough rows for warm-up + timed steps)


CONFIGS = {
    # CI smoke: tiny everything.
    "small": BenchConfig(1024, 64, 2, 4, 2, 128, 256, 2, None, None, 64, 256, 48),
    # CPU, proportioned like 3B: the real 128256 vocabulary (the text head dominates naive trainers),
    # FFN 2.67x hidden like 3B; head_dim 64 and 4 layers so that a step takes seconds on 2 cores.
    # Capacities sized for the synthetic mix (per row at most ~680 text / ~480 audio positions,
    # ~60 text targets, ~310 audio-target columns).
    "cpu3b": BenchConfig(128256, 512, 4, 8, 2, 1376, 1024, 1, 704, 512, 128, 384, 120),
    # The released 3B architecture (bosonai/higgs-audio-v2-generation-3B-base config.json), one row of 2048 positions per step.
    "3b": BenchConfig(128256, 3072, 28, 24, 8, 8192, 2048, 1, 1408, 1024, 256, 768, 240),
}


# ------------------------------------------------------------------------------------------ set-up
def model_args(cfg: BenchConfig):
    """Our model args for ``cfg``, with the tiny tokenizer's special-token ids (looked up by name)."""
    from higgs_tune.data.tokenizer import HiggsTokenizer
    from higgs_tune.models.higgs_audio.builders import tiny_model_args

    special = HiggsTokenizer.from_path(str(TOKENIZER_DIR / "tokenizer.json")).special
    return tiny_model_args(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        audio_ffn_hidden_size=cfg.hidden_size,
        audio_ffn_intermediate_size=cfg.intermediate_size,
        pad_token_id=special.pad,
        text_eos_token_id=special.pad,
        audio_in_token_id=special.audio_in,
        audio_out_token_id=special.audio_out,
        audio_out_bos_token_id=special.audio_out_bos,
        audio_eos_token_id=special.audio_eos,
    )


def load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_rows(cfg: BenchConfig, data_dir: Path, args):
    """Synthetic manifest -> our packed dataset (rows in file order)."""
    from higgs_tune.data.dataset import build_higgs_dataset
    from higgs_tune.data.document import AudioLayout
    from higgs_tune.data.tokenizer import HiggsTokenizer

    manifest = data_dir / "train.jsonl"
    if not manifest.is_file():
        load_tool("make_synthetic").make_synthetic(data_dir, num_samples=cfg.num_samples, num_val=1, seed=0)
    tokenizer = HiggsTokenizer.from_path(str(TOKENIZER_DIR / "tokenizer.json"))
    layout = AudioLayout.from_model_config(args.to_hf_config())
    dataset, _, _ = build_higgs_dataset(
        tokenizer,
        path=str(manifest),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        audio_layout=layout,
        text_ffn_capacity=cfg.text_ffn_capacity,
        audio_ffn_capacity=cfg.audio_ffn_capacity,
        text_target_capacity=cfg.text_target_capacity,
        audio_target_capacity=cfg.audio_target_capacity,
    )
    return dataset, layout


def step_rows(dataset, num_steps: int, batch_size: int) -> list[list[int]]:
    """Row indices of each step (consecutive rows)."""
    needed = num_steps * batch_size
    if len(dataset) < needed:
        raise ValueError(f"the synthetic set packs into {len(dataset)} rows, the benchmark needs {needed}")
    return [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(num_steps)]


def our_batches(dataset, steps: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    from higgs_tune.data.packer import collate_rows

    return [collate_rows([dataset[r] for r in rows], dataset.spec, dataset.pad_id) for rows in steps]


def reference_batches(dataset, steps: list[list[int]], layout) -> list[Any]:
    """Boson's collated batches of the same samples: every document of the step's rows, one per row of
    Boson's batch, right-padded to the longest (round_to 8), as Boson's training collator does."""
    from higgs_tune.boson_reference import boson_dataset_sample, boson_tokenizer, boson_training_collator

    tokenizer = boson_tokenizer(TOKENIZER_DIR / "tokenizer.json")
    special = dataset.tokenizer.special
    collator = boson_training_collator(
        audio_in_token_id=special.audio_in,
        audio_out_token_id=special.audio_out,
        pad_token_id=special.pad,
        layout=layout,
    )

    def boson_sample(entry):
        with open(entry.manifest, "rb") as f:
            f.seek(entry.byte_offset)
            sample = json.loads(f.readline())
        codes = [
            np.load(entry.manifest.parent / item["audio_codes"])
            for message in sample["messages"]
            for item in (message["content"] if isinstance(message["content"], list) else [message["content"]])
            if isinstance(item, dict) and item.get("type") == "audio"
        ]
        try:
            return boson_dataset_sample(sample, codes, tokenizer, layout.num_codebooks)
        except ValueError as error:
            raise ValueError(f"{entry.location}: {error}") from None

    return [
        collator([boson_sample(dataset.entries[i]) for r in rows for i in dataset.rows[r]]) for rows in steps
    ]


# ------------------------------------------------------------------------------------------ the steps
def optimizer_kind(mode: str, device: torch.device, options: dict[str, Any]) -> dict[str, Any]:
    """``build_optimizer`` arguments each step mode needs on ``device``: fused AdamW (float LR) unless
    the optimizer is captured in a CUDA graph (capturable, tensor LR on the device) or updates inside the
    backward (one fused AdamW per parameter)."""
    if mode == "optimizer_in_backward":
        return {"in_backward": True}
    if mode == "cudagraph" and options.get("capture_optimizer", False):
        return {"lr_as_tensor": True, "capturable": device.type == "cuda"}
    return {}


def make_our_step(
    args,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    optimizer_name: str = "adamw",
    text_weight: float = 1.0,
):
    from higgs_tune.loss import AlignedLoss
    from higgs_tune.models.higgs_audio.builders import build_model
    from higgs_tune.models.higgs_audio.lora import freeze_text_only
    from higgs_tune.training.optim import build_optimizer
    from higgs_tune.training.parallelize import compile_decoder_blocks
    from higgs_tune.training.step import build_train_step

    torch.manual_seed(0)
    model = build_model(args, device=device, dtype=dtype)
    if text_weight == 0:  # the recipe's loss.text_weight=0: text head (and what only it reads) frozen
        freeze_text_only(model)
    step_mode, options = mode, {}
    if mode == "optimizer_in_backward":
        # The recipe's compile=true with an optimizer in backward: blocks compiled by the model transform
        # (per-block backward graphs free each gradient early), the loss compiled by the step.
        compile_decoder_blocks(model)
        step_mode, options = "compile", {"compile_model": False}
    kind = optimizer_kind(mode, device, options)
    if optimizer_name == "adamw_foreach":
        if kind.get("capturable") or kind.get("in_backward"):
            raise ValueError("--our-optimizer adamw_foreach: not with a captured or in-backward optimizer")
        kind["implementation"] = "foreach"
    elif optimizer_name == "adamw8bit":
        if kind:
            raise ValueError(
                f"--our-optimizer adamw8bit takes none of {sorted(kind)} (mode {mode} on {device})"
            )
        kind["name"] = "adamw8bit"
    elif optimizer_name == "adamw_bf16":
        if kind.get("capturable"):
            raise ValueError(
                f"--our-optimizer adamw_bf16 has its own update kernel (mode {mode} on {device})"
            )
        kind["moment_dtype"] = "bf16"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, lr=1e-5, **kind)
    loss_fn = AlignedLoss(text_weight=text_weight, text_chunk_size=1024)
    # Optimizer-in-backward cannot clip the global norm (each parameter is updated before the next
    # gradient exists): it runs unclipped; the reference clips at 1.0.
    max_grad_norm = None if mode == "optimizer_in_backward" else 1.0
    step = build_train_step(
        step_mode,
        model,
        loss_fn,
        optimizer,
        None,
        max_grad_norm=max_grad_norm,
        skip_nonfinite=True,  # as the recipe
        text_logits=text_weight != 0,
        **options,
    )

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return step([{k: v.to(device, non_blocking=True) for k, v in batch.items()}])["loss"]

    return run


def make_reference_step(args, device: torch.device, dtype: torch.dtype):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

    from higgs_tune.boson_reference import boson_model_inputs
    from higgs_tune.loss.reference import reference_loss

    config = HiggsAudioConfig(**args.to_hf_config())
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = HiggsAudioModel(config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def run(batch) -> torch.Tensor:
        inputs = boson_model_inputs(batch, device)
        out = model(**inputs)
        loss = reference_loss(
            out.logits,
            out.expanded_labels,
            out.audio_logits,
            inputs["label_audio_ids"],
            inputs["audio_out_ids_start"],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return run


def time_side(run, batches, warmup: int, device: torch.device) -> dict[str, Any]:
    """Run ``warmup`` then timed steps; returns median step time and the losses."""
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = run(batch)
        loss_value = float(loss)  # host sync: the step has finished
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        losses.append(loss_value)
        if i >= warmup:
            times.append(elapsed)
    result: dict[str, Any] = {"step_s": statistics.median(times), "losses": losses}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


# ------------------------------------------------------------------------- transformers' port (peer)
# transformers >= 5.3 ships Boson's model as HiggsAudioV2ForConditionalGeneration; Boson's reference needs
# transformers < 4.47, so the port runs in a virtualenv of its own (--hf-python), created with
#     python -m venv .venv-hf && .venv-hf/bin/pip install torch==2.13.0 'transformers>=5.3'
# Its worker process imports only torch and transformers: it reads its batches from a file this process
# writes, and steps in lockstep with the other sides (one step per line on its stdin).
PORT_SIDES = {"port": True, "port_audio": False}  # side -> use_text_head


def port_inputs(batch: dict[str, torch.Tensor], codebook_size: int, audio_token_id: int, pad_id: int):
    """The documents of one of our packed steps as a transformers-style batch: one document per row
    (HF-trainer style: whole samples, right-padded to the longest), audio columns as ``audio_token_id``
    placeholders with their codes in ``audio_input_ids`` [B, T, K]. Labels are input-aligned (the port
    shifts them inside its loss), so each row trains exactly our targets of that document; codes and
    audio labels >= ``codebook_size`` (stream BOS/EOS: the port's codebook vocabulary has no room for
    them) are clamped to ``codebook_size - 1``, keeping every position and target."""
    docs = []
    audio_columns = batch["audio_in_mask"] | batch["audio_out_mask"]
    for row in range(batch["tokens"].shape[0]):
        length = int(batch["num_tokens"][row])
        doc_ids = batch["doc_ids"][row, :length]
        for doc in doc_ids.unique().tolist():
            pos = (doc_ids == doc).nonzero().flatten()
            audio = audio_columns[row, pos]
            text_labels = torch.full_like(pos, -100)
            text_labels[1:] = batch["text_targets"][row, pos[:-1]]
            audio_labels = torch.full((len(pos), batch["audio_codes"].shape[1]), -100, dtype=torch.long)
            audio_labels[1:] = batch["audio_targets"][row, :, pos[:-1]].T
            audio_labels = torch.where(audio_labels >= codebook_size, codebook_size - 1, audio_labels)
            docs.append(
                {
                    "input_ids": torch.where(audio, audio_token_id, batch["tokens"][row, pos]),
                    "labels": text_labels,
                    "audio_input_ids": batch["audio_codes"][row, :, pos]
                    .T[audio]
                    .clamp(max=codebook_size - 1),
                    "audio_labels": audio_labels[audio],
                }
            )
    length = max(len(d["input_ids"]) for d in docs)
    frames = max(len(d["audio_input_ids"]) for d in docs)
    num_codebooks = batch["audio_codes"].shape[1]
    out = {
        "input_ids": torch.full((len(docs), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(docs), length, dtype=torch.long),
        "labels": torch.full((len(docs), length), -100, dtype=torch.long),
        "audio_input_ids": torch.zeros(len(docs), frames, num_codebooks, dtype=torch.long),
        "audio_input_ids_mask": torch.zeros(len(docs), frames, dtype=torch.bool),
        "audio_labels": torch.full((len(docs), frames, num_codebooks), -100, dtype=torch.long),
    }
    for i, d in enumerate(docs):
        n, t = len(d["input_ids"]), len(d["audio_input_ids"])
        out["input_ids"][i, :n] = d["input_ids"]
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = d["labels"]
        out["audio_input_ids"][i, :t] = d["audio_input_ids"]
        out["audio_input_ids_mask"][i, :t] = True
        out["audio_labels"][i, :t] = d["audio_labels"]
    return out


def port_config(cfg: BenchConfig, args) -> dict[str, Any]:
    """HiggsAudioV2Config arguments of the same architecture (special ids of our tokenizer)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.hidden_size // cfg.num_heads,
        "num_codebooks": args.num_codebooks,
        "codebook_size": args.codebook_size,
        "audio_token_id": args.audio_out_token_id,
        "audio_delay_token_id": args.audio_in_token_id,
        "pad_token_id": args.pad_token_id,
        "bos_token_id": args.pad_token_id,  # generation-only ids, in range for small vocabularies
        "eos_token_id": args.pad_token_id,
        "audio_bos_token_id": args.audio_out_bos_token_id,
        "attn_implementation": "sdpa",
    }


def port_worker(inputs_file: str, use_text_head: bool, threads: int | None) -> None:
    """The port's side (in the --hf-python interpreter): build the model, then for each line ``i`` on
    stdin train on batch i (forward with its own loss, backward, clip 1.0, fused AdamW: HF Trainer's
    defaults) and print ``{"loss", "step_s"}``; at end of input print ``{"peak_rss_gib"}``."""
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    saved = torch.load(inputs_file, weights_only=True)
    torch.manual_seed(0)
    model = HiggsAudioV2ForConditionalGeneration(
        HiggsAudioV2Config(**saved["config"]), use_text_head=use_text_head
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for line in sys.stdin:
        batch = saved["batches"][int(line)]
        if not use_text_head:
            batch = {k: v for k, v in batch.items() if k != "labels"}
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        print(json.dumps({"loss": loss_value, "step_s": time.perf_counter() - start}), flush=True)
    print(
        json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}), flush=True
    )


class PortSide:
    """A port worker process driven one step at a time (so its steps interleave with the other sides')."""

    def __init__(self, hf_python: str, inputs_file: Path, use_text_head: bool, threads: int | None) -> None:
        command = [hf_python, str(Path(__file__).resolve()), "--port-worker", str(inputs_file)]
        command += ["--port-text-head"] if use_text_head else []
        command += ["--threads", str(threads)] if threads else []
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
        )

    def _reply(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the port worker ended (exit {self.process.wait()}); its stderr is above")
        return json.loads(line)

    def step(self, index: int) -> tuple[float, float]:
        """(loss, step seconds) of batch ``index``."""
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()
        reply = self._reply()
        return reply["loss"], reply["step_s"]

    def finish(self) -> float:
        """Peak RSS (GiB) of the worker, which then exits."""
        self.process.stdin.close()
        peak = self._reply()["peak_rss_gib"]
        self.process.wait()
        return peak


def start_port_sides(cli) -> dict[str, PortSide]:
    """Write the port's batches (the documents of our steps) and start one worker per port side."""
    cfg = CONFIGS[cli.config]
    args = model_args(cfg)
    dataset, _ = build_rows(cfg, Path(cli.data_dir), args)
    steps = step_rows(dataset, cli.warmup + cli.steps, cfg.batch_size)
    batches = [
        port_inputs(b, args.codebook_size, args.audio_out_token_id, args.pad_token_id)
        for b in our_batches(dataset, steps)
    ]
    inputs_file = Path(cli.data_dir) / "port_inputs.pt"
    torch.save({"config": port_config(cfg, args), "batches": batches}, inputs_file)
    return {
        side: PortSide(cli.hf_python, inputs_file, head, cli.threads) for side, head in PORT_SIDES.items()
    }


# ------------------------------------------------------------------------------------------ driver
def prepare_side(side: str, cli):
    """(step function, its batches, non-padding positions per step) of one side: ``ours`` (with
    ``--text-weight``), ``ours_audio`` (text weight 0) or ``reference``."""
    cfg = CONFIGS[cli.config]
    device = torch.device(cli.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cli.dtype]
    args = model_args(cfg)
    dataset, layout = build_rows(cfg, Path(cli.data_dir), args)
    steps = step_rows(dataset, cli.warmup + cli.steps, cfg.batch_size)
    if side in ("ours", "ours_audio"):
        batches = our_batches(dataset, steps)
        tokens = [int(b["num_tokens"].sum()) for b in batches]
        text_weight = 0.0 if side == "ours_audio" else cli.text_weight
        step = make_our_step(args, device, dtype, cli.mode, cli.our_optimizer, text_weight)
        return step, batches, tokens
    batches = reference_batches(dataset, steps, layout)
    tokens = reference_tokens(batches, dataset.tokenizer.special)
    return make_reference_step(args, device, dtype), batches, tokens


def reference_tokens(batches: list[Any], special) -> list[int]:
    """Non-padding positions of each of Boson's collated batches: its merged length, real text tokens with
    each audio placeholder replaced by its columns."""
    return [
        int(b.attention_mask.sum())
        - int(((b.input_ids == special.audio_in) | (b.input_ids == special.audio_out)).sum())
        + b.audio_in_ids.shape[1]
        + b.audio_out_ids.shape[1]
        for b in batches
    ]


def finish_side(result: dict[str, Any], tokens: list[int], cli) -> dict[str, Any]:
    """Add tokens/s, peak memory (this process) and MFU to a :func:`time_side` result."""
    device = torch.device(cli.device)
    timed_tokens = statistics.median(tokens[cli.warmup :])
    result["tokens_per_step"] = timed_tokens
    result["tokens_per_s"] = timed_tokens / result["step_s"]
    if device.type != "cuda":
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    else:
        from higgs_tune.training.flops import mfu

        cfg = CONFIGS[cli.config]
        result["device_name"] = torch.cuda.get_device_name(device)
        value = mfu(model_args(cfg), cfg.seq_len, result["tokens_per_s"], device)
        if value is not None:
            result["mfu"] = value
    return result


def run_side(side: str, cli) -> dict[str, Any]:
    run, batches, tokens = prepare_side(side, cli)
    return finish_side(time_side(run, batches, cli.warmup, torch.device(cli.device)), tokens, cli)


def run_interleaved(cli, sides: list[str], ports: dict[str, PortSide]) -> dict[str, Any]:
    """Every side's steps alternating (reference step i, our step i, port step i, ...), ours and the
    reference in this process, the port's in its workers, so a CPU shared with other work slows all
    alike. Peak RSS here counts several sides: not reported from this process."""
    prepared = {side: prepare_side(side, cli) for side in sides}
    times: dict[str, list[float]] = {side: [] for side in [*prepared, *ports]}
    losses: dict[str, list[float]] = {side: [] for side in times}
    for i in range(cli.warmup + cli.steps):
        for side in times:
            if side in ports:
                loss, elapsed = ports[side].step(i)
            else:
                run, batches, _ = prepared[side]
                start = time.perf_counter()
                loss = float(run(batches[i]))
                elapsed = time.perf_counter() - start
            losses[side].append(loss)
            if i >= cli.warmup:
                times[side].append(elapsed)
    results = {}
    reference_tokens = prepared[sides[0]][2]
    for side in times:
        tokens = prepared[side][2] if side in prepared else reference_tokens  # the port: our documents
        result = {"step_s": statistics.median(times[side]), "step_times": times[side], "losses": losses[side]}
        results[side] = finish_side(result, tokens, cli)
        del results[side]["peak_rss_gib"]
    for side, port in ports.items():
        results[side]["peak_rss_gib"] = port.finish()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu3b")
    parser.add_argument("--small", action="store_true", help="the CI smoke configuration (--config small)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 CPU, bf16 CUDA"
    )
    parser.add_argument(
        "--mode", choices=["eager", "compile", "cudagraph", "optimizer_in_backward"], default="compile"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--data-dir", default=None, help="synthetic data (made there if missing)")
    parser.add_argument("--side", choices=["ours", "ours_audio", "reference", "both"], default="both")
    parser.add_argument(
        "--text-weight", type=float, default=1.0, help="our side's loss.text_weight (0: text head skipped)"
    )
    parser.add_argument(
        "--audio-only", action="store_true", help="also run ours with text weight 0 (side ours_audio)"
    )
    parser.add_argument(
        "--hf-python",
        default=None,
        help="python of a virtualenv with transformers>=5.3: also run transformers' port with its text head "
        "(side port) and without (port_audio, its default), next to ours with text weight 0",
    )
    parser.add_argument("--port-worker", default=None, help=argparse.SUPPRESS)  # the port's process
    parser.add_argument("--port-text-head", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--our-optimizer",
        choices=["adamw", "adamw_fused", "adamw_foreach", "adamw8bit", "adamw_bf16"],
        default="adamw",
        help="our side's optimizer: torch AdamW (adamw = adamw_fused: the fused kernel, build_optimizer's "
        "default; or foreach), torchao AdamW8bit, or AdamW with bf16 moments (AdamWBF16Moments); the "
        "reference always runs torch.optim.AdamW, fused on CUDA",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    cli = parser.parse_args(argv)
    if cli.port_worker:
        port_worker(cli.port_worker, cli.port_text_head, cli.threads)
        return {}
    if cli.small:
        cli.config, cli.steps, cli.warmup = "small", 2, 1
        cli.mode = "eager" if cli.mode == "compile" and cli.device == "cpu" else cli.mode
    if cli.dtype is None:
        cli.dtype = "bf16" if cli.device.startswith("cuda") else "fp32"
    if cli.threads:
        torch.set_num_threads(cli.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if cli.data_dir is None:
            cli.data_dir = tmp
        ours = ["ours", "ours_audio"] if cli.audio_only or cli.hf_python else ["ours"]
        if cli.side != "both":
            result = {cli.side: run_side(cli.side, cli)}
        elif cli.device.startswith("cuda"):
            result = {}
            for side in ("reference", *ours):
                result[side] = run_side(side, cli)
                gc.collect()  # the side's model, optimizer and compiled graphs go before the next
                torch.cuda.empty_cache()
            if cli.hf_python:
                raise SystemExit("bench.py: the port runs on CPU only (--hf-python without --device cuda)")
        else:
            # Times from one process, steps interleaved; peak RSS from one fresh process per side
            # (one warm-up + one timed step: the optimizer state exists after the first step).
            # The subprocesses run FIRST: Linux carries a parent's ru_maxrss high-water mark into the
            # children it spawns, so they must start while this process is still small.
            isolated = {
                side: run_in_subprocess(side, cli, steps=1, warmup=1) for side in ("reference", *ours)
            }
            ports = start_port_sides(cli) if cli.hf_python else {}
            result = run_interleaved(cli, ["reference", *ours], ports)
            for side, figures in isolated.items():
                result[side]["peak_rss_gib"] = figures["peak_rss_gib"]
    if cli.side == "both":
        mem_key = "peak_mem_gib" if cli.device.startswith("cuda") else "peak_rss_gib"
        result["ratio"] = ratios(result["ours"], result["reference"], mem_key)
        for mine, theirs in (("ours", "port"), ("ours_audio", "port_audio")):
            if theirs in result:
                result[f"ratio_{mine}_{theirs}"] = ratios(result[mine], result[theirs], mem_key)
        result["settings"] = {k: v for k, v in vars(cli).items() if k != "json"} | {
            "bench_config": asdict(CONFIGS[cli.config]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        print(markdown(result))
    if cli.json:
        Path(cli.json).write_text(json.dumps(result, indent=2))
    if cli.side != "both":
        print(json.dumps(result))
    return result


def ratios(mine: dict[str, Any], theirs: dict[str, Any], mem_key: str) -> dict[str, float]:
    return {
        "tokens_per_s": mine["tokens_per_s"] / theirs["tokens_per_s"],
        "step_time": mine["step_s"] / theirs["step_s"],
        "peak_memory": mine[mem_key] / theirs[mem_key],
    }


def run_in_subprocess(side: str, cli, steps: int, warmup: int) -> dict[str, Any]:
    """Run one side in a fresh interpreter (its own peak RSS); returns its result dict."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
        "--config",
        cli.config,
        "--device",
        cli.device,
        "--dtype",
        cli.dtype,
        "--mode",
        cli.mode,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--data-dir",
        cli.data_dir,
        "--our-optimizer",
        cli.our_optimizer,
        "--text-weight",
        str(cli.text_weight),
    ]
    if cli.threads:
        command += ["--threads", str(cli.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} side failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])[side]


SIDE_NAMES = {
    "reference": "Boson's reference",
    "port": "transformers' port, text head",
    "port_audio": "transformers' port, audio only (its default)",
    "ours": "ours",
    "ours_audio": "ours, `loss.text_weight=0`",
}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    mem_key = "peak_mem_gib" if "peak_mem_gib" in result["ours"] else "peak_rss_gib"
    mem_name = "peak CUDA memory (GiB)" if mem_key == "peak_mem_gib" else "peak RSS (GiB)"
    lines = [
        f"config `{s['config']}` {s['bench_config']}, device {s['device']}, dtype {s['dtype']}, our mode "
        f"`{s['mode']}` with {s['our_optimizer']} (reference and port: torch AdamW), median of {s['steps']} "
        f"steps after {s['warmup']} warm-up, torch {s['torch']}, {s['threads']} threads",
        "",
        f"| side | tokens/s | step time (s) | {mem_name} | MFU |",
        "|---|---|---|---|---|",
    ]
    for side, name in SIDE_NAMES.items():
        if side in result:
            r = result[side]
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
            lines.append(
                f"| {name} | {r['tokens_per_s']:.1f} | {r['step_s']:.3f} | {r[mem_key]:.2f} | {mfu} |"
            )
    for key, name in (
        ("ratio", "ours / reference"),
        ("ratio_ours_port", "ours / port (text + audio)"),
        ("ratio_ours_audio_port_audio", "ours text_weight=0 / port audio only"),
    ):
        if key in result:
            ratio = result[key]
            lines.append(
                f"| {name} | {ratio['tokens_per_s']:.2f}x | {ratio['step_time']:.2f}x | "
                f"{ratio['peak_memory']:.2f}x | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
