"""Fine-tune Higgs Audio v2: the whole training loop, top to bottom.

    tune run recipes/higgs_finetune --config configs/cpu_tiny.yaml
    tune run --nproc_per_node 2 recipes/higgs_finetune --config configs/cpu_tiny.yaml max_steps=20

With more than one process (torchrun), the model is sharded with FSDP2 (``fully_shard`` per decoder
layer and on the root; the ``fsdp`` config node: mixed precision, resharding, CPU offload), each rank
reads its own share of the rows, and checkpoints are torch.distributed.checkpoint folders that resume on
the same or another number of processes.

Every part comes from the YAML config (``_component_`` nodes): tokenizer, data set, model, loss,
optimizer, LR schedule, metric logger. The recipe only wires them together: copy this file
(``tune cp higgs_finetune my_recipe.py``) and change what you need.

Alignment: the data pipeline builds the targets ONCE (targets[t] = label of position t+1 of the same
document); the model returns logits at the positions that have targets; the loss compares logits[i]
with targets[i]. Nothing here shifts anything. The first batch is checked by the alignment guard.

Outputs (README.md, "Monitoring"): ``<output_dir>/logs`` (TensorBoard), ``<output_dir>/metrics.jsonl``,
``<output_dir>/config.yaml`` (the resolved config) and ``<output_dir>/hf`` (Boson-loadable export).
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchtune import config, training
from tqdm import tqdm

from higgs_tune.config import validate_config
from higgs_tune.data.alignment_guard import AlignmentLayout, check_batch_alignment, warn_if_implausibly_low
from higgs_tune.data.capacities import CAPACITY_NAMES, packing_summary, padding_warnings
from higgs_tune.data.dataset import build_dataloader
from higgs_tune.data.document import AudioLayout
from higgs_tune.errors import report_user_errors
from higgs_tune.evaluation import evaluate
from higgs_tune.generation import (
    GenerationTokens,
    SamplingConfig,
    build_prompt,
    code_accuracy,
    generate_batch,
    held_out_speech_prompts,
)
from higgs_tune.models.audio_decoder import AudioCodecDecoder, write_wav
from higgs_tune.models.higgs_audio.builders import build_model, from_checkpoint_dir
from higgs_tune.models.higgs_audio.checkpoint import read_hf_config, save_hf_checkpoint
from higgs_tune.models.higgs_audio.lora import (
    apply_lora,
    freeze_text_only,
    lora_modules,
    merged_state_dict,
    merged_tensors,
    save_adapter,
    set_trainable,
)
from higgs_tune.models.higgs_audio.qlora import (
    quantize_lora_base_,
    quantized_modules,
    state_dict_with_dequantized_base,
)
from higgs_tune.models.higgs_audio.transformers_layout import DEFAULT_AUDIO_TOKENIZER
from higgs_tune.training.checkpointing import (
    fingerprint_frozen_base,
    latest_checkpoint,
    load_checkpoint,
    read_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from higgs_tune.training.distributed import cleanup_distributed, init_distributed, resolve_device
from higgs_tune.training.flops import mfu
from higgs_tune.training.parallelize import FSDPOptions, transform_model
from higgs_tune.training.step import build_train_step, move_batch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class HiggsFinetuneRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)  # one-line errors before any heavy work
        self.cfg = cfg
        # A finite collective timeout: a rank that dies makes the others fail instead of hanging.
        self.dist = init_distributed(cfg.device, timeout_s=cfg.get("collective_timeout_s", 600))
        self.device = resolve_device(cfg.device, self.dist)
        self.dtype = DTYPES[cfg.dtype]
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self.epoch = 0
        self.rows_in_epoch = 0  # rows ALL ranks have drawn in the current epoch (the resumable position)
        self.skipped_updates = 0  # steps whose update was skipped for a non-finite loss or gradient
        self.unread_steps: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, metrics) not yet read
        self.alignment_checked = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        training.set_seed(seed=cfg.seed)
        if self.dist.is_main:
            try:  # an unwritable output folder fails now, not at the first checkpoint hours later
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            except OSError as exc:
                raise OSError(f"output_dir {self.output_dir} is not writable: {exc}") from exc

        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.loss_fn = config.instantiate(cfg.loss).to(self.device)  # its buffers (codebook weights)
        self.model = self._setup_model()
        model_config = self.model.args.to_hf_config()
        self.tokenizer.check_against_model_config(model_config)  # special token ids, vocab size

        audio_layout = AudioLayout.from_model_config(model_config)
        self.codebook_size = audio_layout.codebook_size
        # Per-row capacities: planned from the data ("auto") or explicit; a resumed run keeps its own.
        resumed = {"resumed_capacities": self._resumed_capacities()} if cfg.resume_from_checkpoint else {}
        self.train_set, self.val_set, self.data_stats = config.instantiate(
            cfg.dataset,
            self.tokenizer,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            audio_layout=audio_layout,
            seed=cfg.seed,
            **resumed,
        )
        self.spec = self.train_set.spec
        self._record_capacities()
        self.loader = build_dataloader(
            self.train_set,
            self.spec,
            seed=cfg.seed,
            shuffle=True,
            num_workers=cfg.get("num_workers", 0),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            drop_last=True,
        )
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = build_dataloader(
                self.val_set,
                self.val_set.spec,
                seed=cfg.seed,
                shuffle=False,
                num_workers=cfg.get("num_workers", 0),
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                drop_last=False,
            )
        batches_per_epoch = len(self.loader) // cfg.gradient_accumulation_steps
        if batches_per_epoch == 0:
            raise ValueError(
                f"{len(self.loader)} batches per epoch on this rank is fewer than "
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: more data or smaller batches"
            )
        self.total_steps = batches_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, trainable)
        self.lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps
        )
        # One step (higgs_tune/training/step.py); the mode only changes what is compiled or captured.
        # The decoder blocks were compiled by the model transform when the step cannot compile the model
        # as one graph (FSDP's hooks; an optimizer in backward, whose memory saving needs per-block
        # backward graphs): then the step compiles the loss alone.
        step_mode = "cudagraph" if cfg.cuda_graphs else "compile" if cfg.compile else "eager"
        self.on_nonfinite = cfg.get("on_nonfinite", "skip")  # skip | stop (validated with the config)
        self.train_step = build_train_step(
            step_mode,
            self.model,
            self.loss_fn,
            self.optimizer,
            self.lr_scheduler,
            max_grad_norm=cfg.get("max_grad_norm", 1.0),
            process_group=dist.group.WORLD if self.dist.is_distributed else None,
            reduce_gradients=not self.dist.is_distributed,
            skip_nonfinite=True,  # never train on NaN: a non-finite step updates nothing
            text_logits=self.loss_fn.text_weight != 0,
            compile_model=not self.blocks_compiled,
            **cfg.get("step_options", {}),
        )
        self._log(f"step: {step_mode}; {self.train_step.describe_nonfinite_policy()}")
        self.metric_logger = config.instantiate(cfg.metric_logger, rank=self.dist.rank)
        self.metric_logger.log_config(OmegaConf.to_yaml(cfg, resolve=True))
        self.metric_logger.log_dict(setup_scalars(self.data_stats), step=0)  # packing, at set-up
        self.audio_decoder = self._setup_audio_decoder(audio_layout)
        self.alignment_layout = AlignmentLayout(
            audio_in_token_id=self.tokenizer.special.audio_in,
            audio_out_token_id=self.tokenizer.special.audio_out,
            audio_out_bos_token_id=self.tokenizer.special.audio_out_bos,
            audio_eos_token_id=self.tokenizer.special.audio_eos,
            codebook_size=audio_layout.codebook_size,
        )
        if cfg.resume_from_checkpoint:
            self.resume()
        num_params = sum(p.numel() for p in self.model.parameters())
        self._log(
            f"model: {num_params:,} parameters ({sum(p.numel() for p in trainable):,} trainable); "
            f"data: {self.data_stats}; {self.total_steps} optimizer steps"
        )

    def _resumed_capacities(self) -> dict[str, int] | None:
        """The per-row capacities the run being resumed started with (None: a checkpoint from before they
        were saved, or none to resume: :meth:`resume` reports that)."""
        path = latest_checkpoint(self.output_dir / "checkpoints")
        if path is None:
            return None
        verify_checkpoint(path)
        return read_training_state(path).get("packing_capacities")

    def _record_capacities(self) -> None:
        """Check that every rank packed with the same capacities, put them into the resolved config.yaml
        (numbers instead of "auto") and log them with the padding of every dimension."""
        capacities = {name: self.spec.capacity(name) for name in CAPACITY_NAMES}
        if self.dist.is_distributed:
            everyone: list = [None] * self.dist.world_size
            dist.all_gather_object(everyone, capacities)
            if any(other != capacities for other in everyone):
                raise RuntimeError(
                    f"the ranks planned different capacities {everyone}: does every rank read the same data?"
                )
        requested = {name: self.cfg.dataset.get(f"{name}_capacity") for name in CAPACITY_NAMES}
        for name, value in capacities.items():
            if f"{name}_capacity" in self.cfg.dataset:
                self.cfg.dataset[f"{name}_capacity"] = value
        if self.dist.is_main:
            (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        self._log(packing_summary(self.data_stats, "train"))
        for warning in padding_warnings(self.data_stats, requested, "train"):
            self._log(f"WARNING: {warning}")
        if self.val_set is not None:
            self._log(packing_summary(self.data_stats, "val"))

    def _setup_model(self) -> torch.nn.Module:
        cfg = self.cfg
        checkpoint_dir = cfg.checkpointer.checkpoint_dir
        finetune = cfg.get("finetune", {})
        # Random initialisation (the model without a checkpoint, LoRA adapters) from the GLOBAL seed:
        # every rank builds the same weights (set_seed gave each rank its own stream), FSDP shards them.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            if checkpoint_dir is not None:
                # Tokenizer vs checkpoint (special token ids, vocab size) before gigabytes of weights load
                # (Boson's or transformers' layout, told apart by its config.json).
                self.tokenizer.check_against_model_config(read_hf_config(checkpoint_dir))
                model = from_checkpoint_dir(checkpoint_dir, dtype=self.dtype, device=self.device)
            else:
                with training.set_default_dtype(self.dtype):
                    model = config.instantiate(cfg.model, device=self.device, dtype=self.dtype)
            # What trains: everything, LoRA adapters, or the audio adapter (text backbone frozen).
            if finetune.get("lora") is not None:
                lora = finetune.lora
                apply_lora(
                    model,
                    list(lora.targets),
                    rank=lora.rank,
                    alpha=lora.alpha,
                    dropout=lora.get("dropout", 0.0),
                )
            if finetune.get("quantize_base") is not None:  # QLoRA: the bases under the adapters in NF4
                quantize_lora_base_(model, **finetune.quantize_base)
        set_trainable(model, finetune.get("mode", "full"))
        self._freeze_what_has_no_loss(model)
        # LoRA / audio adapter: checkpoints store only what trains, and the fingerprint of the frozen
        # base it trains on (taken before FSDP shards it); resume refuses another base.
        source = (
            f"random init, seed {cfg.seed}" if checkpoint_dir is None else str(Path(checkpoint_dir).resolve())
        )
        self.frozen_base = fingerprint_frozen_base(model, source, model.args.to_hf_config())
        if self.dist.is_distributed and quantized_modules(model):
            raise ValueError("finetune.quantize_base (QLoRA) is single-process; remove it with torchrun")
        if self.dist.is_distributed and cfg.cuda_graphs:
            raise ValueError("cuda_graphs=true is single-process only; set cuda_graphs=false with torchrun")
        # torchtitan's order: activation checkpointing, per-block compile, FSDP2 (LoRA/freezing above).
        in_backward = bool(cfg.optimizer.get("in_backward", False))
        if in_backward and (self.dist.is_distributed or cfg.cuda_graphs):
            raise ValueError("optimizer in_backward=true is single-process, without cuda_graphs")
        self.blocks_compiled = cfg.compile and (self.dist.is_distributed or in_backward)
        transform_model(
            model,
            activation_checkpointing=cfg.get("activation_checkpointing", False),
            compile_blocks=self.blocks_compiled,
            fsdp=FSDPOptions(**cfg.get("fsdp", {})) if self.dist.is_distributed else None,
        )
        return model

    def _freeze_what_has_no_loss(self, model: torch.nn.Module) -> None:
        """``loss.text_weight: 0``: the text head is neither computed nor trained, nor is what only it
        reads (frozen, so no optimizer state, no gradient, no weight decay; the export keeps it
        unchanged). A codebook weight of 0 is said, not acted on: the audio head is one matrix for all
        codebooks."""
        if self.loss_fn.text_weight == 0:
            frozen = freeze_text_only(model)
            self._log(
                f"loss.text_weight=0: the text head is not computed in training steps; it and what only "
                f"it reads are not trained ({len(frozen)} parameters frozen: {', '.join(frozen)}); the "
                "export keeps them unchanged; validation still measures the text loss"
            )
        weights = self.loss_fn.codebook_weights
        for k in [] if weights is None else (weights == 0).nonzero().flatten().tolist():
            self._log(
                f"loss.codebook_weights[{k}]=0: codebook {k}'s logits are still computed (one audio head for "
                f"all codebooks) and logged; its rows of the audio head get no gradient from the loss "
                "(weight decay still applies to them)"
            )

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg
        grad_accum = cfg.gradient_accumulation_steps
        progress = tqdm(
            total=self.total_steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True
        )
        micro_batches: list[dict[str, torch.Tensor]] = []
        tokens_since_log, data_time = 0, 0.0
        window_start = time.perf_counter()
        while self.step < self.total_steps:
            self.loader.sampler.set_epoch(self.epoch)
            fetch_start = time.perf_counter()
            for batch in self.loader:
                data_time += time.perf_counter() - fetch_start
                self.rows_in_epoch += self.cfg.batch_size * self.dist.world_size
                if not self.alignment_checked:
                    check_batch_alignment(batch, self.alignment_layout)  # the single-shift invariants
                    self.alignment_checked = True
                tokens_since_log += int(batch["num_tokens"].sum())  # counted on the CPU: no device sync
                micro_batches.append(move_batch(batch, self.device))
                if len(micro_batches) == grad_accum:
                    lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses (a copy: a tensor LR
                    lr = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr  # changes in place)
                    metrics = self.train_step(micro_batches)
                    micro_batches = []
                    self.step += 1
                    progress.update(1)
                    self.unread_steps.append((self.step, metrics))  # their skip flags are read when logging
                    if self.step % cfg.log_every_n_steps == 0 or self.step == self.total_steps:
                        self._read_nonfinite_flags()
                        elapsed = time.perf_counter() - window_start
                        record = self._log_metrics(metrics, lr, tokens_since_log, elapsed, data_time)
                        progress.set_postfix(
                            loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}"
                        )
                        tokens_since_log, data_time = 0, 0.0
                        window_start = time.perf_counter()
                    eval_every = cfg.get("eval_every_n_steps")
                    if eval_every and self.step % eval_every == 0 and self.step != self.total_steps:
                        self.validate()
                    speak_every = (cfg.get("generation") or {}).get("every_n_steps")
                    if speak_every and self.step % speak_every == 0 and self.step != self.total_steps:
                        self.generate_held_out(self.full_state_dict())
                    if self.step % cfg.save_every_n_steps == 0 or self.step == self.total_steps:
                        self._read_nonfinite_flags()  # the checkpoint counts every skipped update
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                fetch_start = time.perf_counter()
            else:
                self.epoch += 1  # the epoch ran to its end
                self.rows_in_epoch = 0
                micro_batches = []  # an incomplete accumulation group does not cross epochs
        progress.close()

    def _read_nonfinite_flags(self) -> None:
        """Read the skip flags of the steps since the last read (one host read for all of them: the step
        itself never waits for the device) and report each skipped step."""
        if not self.unread_steps:
            return
        flags = torch.stack([metrics["update_skipped"] for _, metrics in self.unread_steps]).tolist()
        unread, self.unread_steps = self.unread_steps, []
        for (step, metrics), skipped in zip(unread, flags):
            if skipped:  # decided by the step on every rank alike
                self._handle_nonfinite_step(step, metrics)

    def _handle_nonfinite_step(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Step ``step``'s loss or gradient norm was NaN/inf and it updated nothing (the step skipped it
        on the device); say so, count it, and stop when the config says ``on_nonfinite: stop``."""
        self.skipped_updates += 1
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        self.metric_logger.log_dict(
            {
                "nonfinite_step": 1,
                "nonfinite_loss": loss,
                "nonfinite_grad_norm": grad_norm,
                "skipped_updates": self.skipped_updates,
            },
            step=step,
        )
        unchanged = "parameters and optimizer state are unchanged"
        if "skipped_parameters" in metrics:  # optimizer in backward: only the non-finite ones were skipped
            unchanged = f"{int(metrics['skipped_parameters'])} of {len(self.train_step.trainable)} parameters"
        message = (
            f"step {step}: non-finite loss or gradient (this rank's loss {loss}, grad norm {grad_norm}); "
            f"the update was skipped ({unchanged})"
        )
        if self.on_nonfinite == "stop":
            raise FloatingPointError(f"{message}; stopping (on_nonfinite=stop)")
        self._log(f"WARNING: {message} (on_nonfinite=skip; {self.skipped_updates} skipped so far)")

    def _log_metrics(
        self,
        metrics: dict[str, torch.Tensor],
        lr: float | torch.Tensor,
        tokens: int,
        elapsed: float,
        data_time: float,
    ) -> dict:
        """Global values (summed over ranks: every loss term is already divided by the global count)."""
        per_rank = {k: v for k, v in metrics.items() if k not in ("grad_norm", "update_skipped")}
        summed = {k: v.detach().float().reshape(-1) for k, v in per_rank.items()}
        if self.dist.is_distributed:
            flat = torch.cat(list(summed.values()))
            dist.all_reduce(flat)
            summed = dict(zip(summed, flat.split([v.numel() for v in summed.values()])))
            tokens_t = torch.tensor([tokens], dtype=torch.float64, device=self.device)
            dist.all_reduce(tokens_t)
            tokens = int(tokens_t.item())
        payload = {
            "loss": summed["loss"],
            "text_loss": summed["text_loss"],
            "audio_loss": summed["audio_loss"],
            "codebook_loss": summed["codebook_losses"],
            "text_accuracy": summed["text_accuracy"],
            "codebook_accuracy": summed["codebook_accuracies"],
            "num_text_targets": summed["num_text_targets"],
            "num_audio_targets": summed["num_audio_targets"],
            "lr": lr,
            "grad_norm": metrics["grad_norm"],
            "tokens_per_sec": tokens / max(elapsed, 1e-9),
            "data_time_share": data_time / max(elapsed, 1e-9),
            "skipped_samples": self.data_stats["skipped_samples"],
            "skipped_updates": self.skipped_updates,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        utilisation = mfu(
            self.model.args, self.spec.seq_len, payload["tokens_per_sec"], self.device, self.dist.world_size
        )
        if utilisation is not None:  # CUDA cards with a known peak only
            payload["mfu"] = utilisation
        record = self.metric_logger.log_dict(payload, step=self.step)
        # The "loss ~1e-3, silent output" fingerprint of a target leak, checked on the first logged steps.
        warn_if_implausibly_low(
            record["audio_loss"],
            self.step,
            self.codebook_size,
            first_steps=max(10, self.cfg.log_every_n_steps),
        )
        return record

    def _setup_audio_decoder(self, audio_layout: AudioLayout) -> AudioCodecDecoder | None:
        """Boson's audio tokenizer's decoder (``generation.audio_decoder``: its folder), on rank 0's CPU,
        loaded now so that a wrong folder fails before training; generated speech becomes waveforms."""
        path = (self.cfg.get("generation") or {}).get("audio_decoder")
        if path is None or not self.dist.is_main:
            return None
        decoder = AudioCodecDecoder.from_pretrained(path)
        try:
            decoder.check_codes_layout(audio_layout.num_codebooks, audio_layout.codebook_size)
        except ValueError as error:
            raise ValueError(f"generation.audio_decoder {path}: {error}") from None
        if not hasattr(self.metric_logger, "log_audio"):
            raise TypeError(
                f"generation.audio_decoder needs a metric logger with log_audio (HiggsMetricLogger); "
                f"{type(self.metric_logger).__name__} has none"
            )
        return decoder

    # ------------------------------------------------------------------ validation / generation
    def validate(self) -> None:
        """Losses and teacher-forced accuracies on the held-out split, as token means over all of it."""
        if self.val_loader is None:
            return
        group = dist.group.WORLD if self.dist.is_distributed else None
        result = evaluate(self.model, self.val_loader, self.loss_fn, self.device, process_group=group)
        payload = {
            "val_loss": result["loss"],
            "val_text_loss": result["text_loss"],
            "val_audio_loss": result["audio_loss"],
            "val_codebook_loss": result["codebook_losses"],
            "val_text_accuracy": result["text_accuracy"],
            "val_codebook_accuracy": result["codebook_accuracies"],
        }
        self.metric_logger.log_dict(payload, step=self.step)
        self._log(
            f"step {self.step}: validation loss {result['loss']:.4f} (audio {result['audio_loss']:.4f})"
        )

    def generate_held_out(self, full_state: dict[str, torch.Tensor] | None) -> None:
        """Speak the first ``generation.num_prompts`` held-out prompts (rank 0; KV-cached, in batches of
        ``generation.batch_size``, default 8; greedy, or sampled with ``generation.sampling`` from one
        generator per prompt, so the training RNG is untouched) and report how
        many of the reference answer's codes the model reproduces; codes (and waveforms) go to
        ``<output_dir>/generations/step_<N>/``. ``full_state``: see :meth:`full_state_dict`."""
        gen_cfg = self.cfg.get("generation")
        if gen_cfg is None or not gen_cfg.get("num_prompts") or gen_cfg.get("manifest") is None:
            return
        model = self._inference_model(full_state)
        if not self.dist.is_main:
            return
        layout = AudioLayout.from_model_config(model.args.to_hf_config())
        tokens = GenerationTokens.from_tokenizer(self.tokenizer, model.args)
        out_dir = self.output_dir / "generations" / f"step_{self.step:08d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        sampling = SamplingConfig(**(gen_cfg.get("sampling") or {}))  # default: greedy
        held_out_prompts = held_out_speech_prompts(gen_cfg.manifest, gen_cfg.num_prompts)
        prompts = [
            build_prompt(h.messages, self.tokenizer, layout, h.context_codes, force_audio=True)
            for h in held_out_prompts
        ]
        seed = gen_cfg.get("seed", self.cfg.seed)  # prompt i draws from its own generator seeded seed + i
        generators = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(prompts))]
        was_training = model.training
        model.eval()
        results = generate_batch(
            model,
            prompts,
            tokens,
            max_new_columns=gen_cfg.max_new_columns,
            sampling=sampling,
            generators=generators,
            batch_size=gen_cfg.get("batch_size", 8),
        )
        model.train(was_training)
        accuracies = []
        for index, (held_out, result) in enumerate(zip(held_out_prompts, results)):
            generated = result.audio_codes[0] if result.audio_codes else torch.zeros(layout.num_codebooks, 0)
            np.save(out_dir / f"sample_{index:03d}.npy", generated.numpy().astype(np.int16))
            accuracies.append(code_accuracy(generated, held_out.reference_codes[0]))
            if self.audio_decoder is not None:
                self._log_speech(index, generated, held_out.reference_codes[0], out_dir)
        mean = sum(accuracies) / len(accuracies)
        self.metric_logger.log_dict(
            {"generation_code_accuracy": mean, "generation_code_accuracy_per_prompt": accuracies},
            step=self.step,
        )
        self._log(f"greedy generation of {len(accuracies)} held-out prompts: code accuracy {mean:.4f}")

    def _log_speech(self, index: int, generated: torch.Tensor, reference: np.ndarray, out_dir: Path) -> None:
        """Generated and reference codes [K, T] as waveforms: TensorBoard audio and wav files."""
        rate = self.audio_decoder.sample_rate
        for kind, codes in (("generated", generated), ("reference", torch.from_numpy(reference))):
            if codes.shape[1] == 0:  # nothing spoken: no waveform (its accuracy is already 0)
                continue
            waveform = self.audio_decoder(codes[None].long())[0]  # [T * hop_length]
            self.metric_logger.log_audio(f"generation/{index:03d}_{kind}", waveform, rate, step=self.step)
            write_wav(out_dir / f"sample_{index:03d}_{kind}.wav", waveform, rate)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """FSDP runs: the complete model state dict, on rank 0's CPU (collective: every rank takes part
        in the gather); one process: None (the model itself is complete)."""
        if not self.dist.is_distributed:
            return None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def _inference_model(self, full_state: dict[str, torch.Tensor] | None) -> torch.nn.Module | None:
        """The model to generate with: the trained model itself, or in FSDP runs an unsharded copy on
        rank 0 built from ``full_state`` (LoRA merged; None on the other ranks), so rank 0 generates
        without the other ranks."""
        if not self.dist.is_distributed:
            return self.model
        if not self.dist.is_main:
            return None
        model = build_model(self.model.args, device=self.device, dtype=self.dtype)
        model.load_state_dict(merged_state_dict(self.model, full_state))
        return model

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Model and optimizer (torch.distributed.checkpoint: every rank writes its shards; LoRA and
        audio-adapter runs: only the trainable parameters, and the frozen base's fingerprint), LR
        schedule, data position, every rank's RNG, step and epoch, atomically under
        ``<output_dir>/checkpoints/step_<N>``."""
        rng = [rng_state()]
        if self.dist.is_distributed:
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        training_state = {
            "lr_scheduler": self.lr_scheduler.state_dict(),
            # Rows of this epoch consumed by ALL ranks: a position that any number of ranks can resume.
            "global_rows_consumed": self.rows_in_epoch,
            "skipped_updates": self.skipped_updates,
            "rng": rng,
            "packing_capacities": self.train_set.capacities(),  # a resumed run packs with these
        }
        path = save_checkpoint(
            self.output_dir / "checkpoints",
            step=self.step,
            epoch=self.epoch,
            model=self.model,
            optimizer=self.optimizer,
            training_state=training_state,
            keep_last=self.cfg.get("keep_last_n_checkpoints", 2),
            frozen_base=self.frozen_base,
        )
        self._log(f"saved checkpoint {path}")

    def resume(self) -> None:
        """Continue from the newest complete checkpoint under ``<output_dir>/checkpoints``, written by
        this or by another number of processes (keep the global batch, ``batch_size`` x processes)."""
        path = latest_checkpoint(self.output_dir / "checkpoints")
        if path is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=true but there is no checkpoint under {self.output_dir / 'checkpoints'}"
            )
        checkpoint = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, frozen_base=self.frozen_base
        )
        state = checkpoint.training_state
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.loader.sampler.resume_at(checkpoint.epoch, state["global_rows_consumed"])
        self.rows_in_epoch = state["global_rows_consumed"]
        # Same number of ranks: each continues its own RNG stream. Otherwise rank r takes the stream of
        # rank r mod (saved ranks): the model, optimizer and data order are exact, sampling noise is not.
        set_rng_state(state["rng"][self.dist.rank % len(state["rng"])])
        self.step, self.epoch = checkpoint.step, checkpoint.epoch
        self.skipped_updates = state["skipped_updates"]
        message = f"resumed from {path} at step {self.step}, epoch {self.epoch}"
        if checkpoint.world_size != self.dist.world_size:
            message += f" (written by {checkpoint.world_size} process(es), resumed on {self.dist.world_size})"
        self._log(message)

    # ------------------------------------------------------------------ export / cleanup
    def save_export(self, full_state: dict[str, torch.Tensor] | None) -> None:
        """Write ``<output_dir>/hf`` in Boson's layout, with the tokenizer files, and, if ``export.formats``
        lists ``transformers``, ``<output_dir>/hf_transformers`` in transformers' HiggsAudioV2 layout (rank 0;
        FSDP runs from ``full_state``, see :meth:`full_state_dict`)."""
        if not self.dist.is_main:
            return
        export = self.cfg.get("export") or {}
        # LoRA runs export merged weights (loadable as a plain checkpoint), each merged when it is
        # written (one tensor at a time), and the adapter alone.
        if full_state is None and quantized_modules(self.model):  # QLoRA: merge into dequantized bases
            full_state = state_dict_with_dequantized_base(self.model)
        state = merged_tensors(self.model, full_state)
        tokenizer_path = Path(self.cfg.tokenizer.path)
        tokenizer_dir = tokenizer_path if tokenizer_path.is_dir() else tokenizer_path.parent
        if "transformers" in export.get("formats", ["boson"]):
            transformers_dir = save_hf_checkpoint(
                state,
                self.model.args,
                self.output_dir / "hf_transformers",
                layout="transformers",
                tokenizer_dir=tokenizer_dir,
                audio_tokenizer=export.get("audio_tokenizer", DEFAULT_AUDIO_TOKENIZER),
            )
            self._log(f"exported {transformers_dir} (transformers layout)")
        export_dir = save_hf_checkpoint(state, self.model.args, self.output_dir / "hf")
        if lora_modules(self.model):
            save_adapter(self.model, self.output_dir / "adapter" / "adapter.safetensors", full_state)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, export_dir / name)
        self._log(f"exported {export_dir}")

    def cleanup(self) -> None:
        self.metric_logger.close()
        cleanup_distributed()

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)


def setup_scalars(data_stats: dict[str, int | float]) -> dict[str, int | float]:
    """The data set-up's numbers for metrics.jsonl / TensorBoard (``setup/<name>``, logged at step 0)."""
    return {f"setup/{name}": value for name, value in data_stats.items()}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = HiggsFinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.validate()
    full_state = recipe.full_state_dict()  # FSDP runs: the shards gathered once, for both
    recipe.generate_held_out(full_state)
    recipe.save_export(full_state)
    recipe.cleanup()


if __name__ == "__main__":
    # A data / checkpoint / tokenizer error is one line (tune: error: ...), exit 2; --verbose: traceback.
    sys.exit(report_user_errors(recipe_main))
