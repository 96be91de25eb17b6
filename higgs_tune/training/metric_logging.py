"""Metric logging: TensorBoard event files and a JSON-lines copy of the same records.

``<output_dir>/logs`` holds the TensorBoard events (``tensorboard --logdir <output_dir>/logs``) and
``<output_dir>/metrics.jsonl`` one JSON object per logged step (the config's ``metric_logger``, README.md "Monitoring"). Values may be Python
numbers or tensors; tensors are converted here, at logging time, so the training step itself never
synchronises with the host. A tensor with several elements (per-codebook losses) is written as
``name/0 .. name/K-1`` to TensorBoard and as a list to the JSON line. Waveforms (generated speech, when
an audio decoder is configured) go to TensorBoard's audio tab only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


class HiggsMetricLogger:
    """Writes every record to TensorBoard and to ``metrics.jsonl``; only rank 0 writes.

    Args:
        output_dir: the run's output folder.
        log_dir: TensorBoard folder (default ``<output_dir>/logs``).
        jsonl_path: JSON-lines file (default ``<output_dir>/metrics.jsonl``).
        rank: this process's rank; ranks other than 0 log nothing.
    """

    def __init__(
        self,
        output_dir: str,
        log_dir: str | None = None,
        jsonl_path: str | None = None,
        rank: int = 0,
    ) -> None:
        self.rank = rank
        self._writer = None
        self._jsonl = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        out = Path(output_dir)
        self.log_dir = Path(log_dir) if log_dir else out / "logs"
        self.jsonl_path = Path(jsonl_path) if jsonl_path else out / "metrics.jsonl"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")

    def log_dict(self, payload: dict[str, Any], step: int) -> dict[str, Any]:
        """Log one record at ``step``; returns the record as plain Python values."""
        record: dict[str, Any] = {"step": int(step)}
        for name, value in payload.items():
            record[name] = _to_python(value)
        if self.rank != 0:
            return record
        for name, value in record.items():
            if name == "step":
                continue
            if isinstance(value, list):
                for i, item in enumerate(value):
                    self._writer.add_scalar(f"{name}/{i}", item, step)
            elif isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, step)
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        return record

    def log_audio(self, tag: str, waveform: torch.Tensor, sample_rate: int, step: int) -> None:
        """A mono waveform ``[samples]`` (clipped to [-1, 1]) as TensorBoard audio under ``tag``."""
        if self.rank == 0:
            clipped = waveform.detach().float().cpu().clamp(-1.0, 1.0)[None]  # [1, samples]
            self._writer.add_audio(tag, clipped, step, sample_rate=sample_rate)
            self._writer.flush()

    def log_config(self, config_yaml: str) -> None:
        if self.rank == 0:
            self._writer.add_text("config", f"```yaml\n{config_yaml}\n```", 0)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _to_python(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        return value.item() if value.numel() == 1 else value.flatten().tolist()
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return value
    return value
