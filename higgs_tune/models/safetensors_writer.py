"""Write safetensors files tensor by tensor, so that an export never holds more than one output tensor
beyond what the model already holds.

``safetensors.torch.save_file`` needs every tensor of a file in memory and copies each one into a
``bytes`` object before writing, so exporting a merged LoRA model (each adapted weight a new tensor) with
it costs the merged model plus a shard on top of the base. Here an output tensor is a
:class:`LazyTensor`: its shape and dtype are known up front (they fill the header), its values are
produced when the writer reaches it, written straight from the tensor's memory, and dropped.

The files are byte for byte what ``save_file`` writes for the same tensors and metadata (same header
JSON, same tensor order: dtype by descending ``safetensors`` rank, then name; header padded with spaces
to a multiple of 8 bytes); the tests compare them.

:func:`write_sharded` splits a set of named tensors into shards of at most ``max_shard_bytes`` (in the
given order, a new shard when the next tensor would overflow it) and writes either one file or the
shards plus a ``<name>.safetensors.index.json``; any checkpoint layout (Boson's, transformers') can
reuse it with its own names.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

# safetensors' dtype names, in the order of its Rust ``Dtype`` enum (files list higher ranks first).
_DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_DTYPE_NAMES)}


@dataclass(frozen=True)
class LazyTensor:
    """An output tensor described before it exists: ``materialize()`` returns a CPU or device tensor
    of exactly ``shape`` and ``dtype`` (checked when it is written)."""

    shape: torch.Size
    dtype: torch.dtype
    materialize: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> LazyTensor:
        """An existing tensor, cast to ``dtype`` (None: as it is) only when it is written."""
        out_dtype = tensor.dtype if dtype is None else dtype
        return cls(tensor.shape, out_dtype, lambda: tensor.detach().to(out_dtype))

    def cast(self, dtype: torch.dtype | None) -> LazyTensor:
        """The same values cast to ``dtype`` when materialised (None: unchanged)."""
        if dtype is None or dtype == self.dtype:
            return self
        return LazyTensor(self.shape, dtype, lambda: self.materialize().to(dtype))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def lazy(tensor: torch.Tensor | LazyTensor) -> LazyTensor:
    return tensor if isinstance(tensor, LazyTensor) else LazyTensor.of(tensor)


def write_safetensors(
    path: str | Path, tensors: Mapping[str, LazyTensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write one safetensors file, materialising one tensor at a time.

    Args:
        path: the file to write.
        tensors: name -> tensor to produce.
        metadata: the header's ``__metadata__`` (one key, or keys in the order ``save_file`` would
            write them: its own map is unordered).

    Raises:
        ValueError: a materialised tensor whose shape or dtype differs from its description, or a
            dtype safetensors cannot store.
    """
    unsupported = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _DTYPE_RANK})
    if unsupported:
        raise ValueError(f"safetensors cannot store dtypes {unsupported}")
    order = sorted(tensors, key=lambda name: (-_DTYPE_RANK[tensors[name].dtype], name))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name in order:
        spec = tensors[name]
        header[name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path = Path(path)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for name in order:
            _write_tensor(handle, name, tensors[name])
    return path


def _write_tensor(handle: BinaryIO, name: str, spec: LazyTensor) -> None:
    tensor = spec.materialize()
    if tensor.shape != spec.shape or tensor.dtype != spec.dtype:
        raise ValueError(
            f"tensor {name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
            f"described as {tuple(spec.shape)} {spec.dtype}"
        )
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    handle.write(data.numpy().data)


def plan_shards(tensors: Mapping[str, LazyTensor], max_shard_bytes: int) -> list[list[str]]:
    """Names per shard, in the given order: a new shard starts when the next tensor would make the
    current one exceed ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in tensors.items():
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    return shards


def write_sharded(
    folder: str | Path,
    tensors: Mapping[str, LazyTensor],
    *,
    max_shard_bytes: int,
    file_stem: str = "model",
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``<file_stem>.safetensors``, or shards ``<file_stem>-0000i-of-0000n.safetensors`` plus
    ``<file_stem>.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), into ``folder``,
    one tensor in memory at a time. Returns the files written."""
    folder = Path(folder)
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        return [write_safetensors(folder / f"{file_stem}.safetensors", tensors, metadata)]
    written, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        file_name = f"{file_stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        written.append(write_safetensors(folder / file_name, {n: tensors[n] for n in names}, metadata))
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(spec.nbytes for spec in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_path = folder / f"{file_stem}.safetensors.index.json"
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return [*written, index_path]
