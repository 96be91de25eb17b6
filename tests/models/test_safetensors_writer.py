"""The tensor-by-tensor safetensors writer and the streamed export: byte for byte what
``safetensors.torch.save_file`` (and the export that merged everything first) writes, one merged tensor
alive at a time."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import INDEX_FILE, save_hf_checkpoint
from higgs_tune.models.higgs_audio.lora import apply_lora, merged_state_dict, merged_tensors
from higgs_tune.models.safetensors_writer import LazyTensor, write_safetensors

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
    torch.int16,
    torch.uint16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.uint32,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.uint64,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    bits = torch.randint(
        0, 256, (max(1, int(torch.tensor(shape).prod())) * dtype.itemsize,), generator=generator
    )
    raw = bits.to(torch.uint8)
    if dtype == torch.bool:
        return (raw[: int(torch.tensor(shape).prod())] % 2).bool().reshape(shape)
    return raw[: int(torch.tensor(shape).prod()) * dtype.itemsize].view(dtype).reshape(shape)


def test_files_equal_save_file_byte_for_byte(tmp_path: Path):
    """Every dtype safetensors stores, scalars, empty and odd-sized tensors, names that sort
    differently from insertion order: the same header (order, padding) and data as save_file."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 5), (), (0, 4), (7, 1, 3)]
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        shape = shapes[i % len(shapes)]
        tensors[f"layer.{(7 * i) % 11}.w{i}"] = random_tensor(dtype, shape, generator)
    tensors["a_first_name"] = torch.randn(5, generator=generator)
    for metadata in (None, {"format": "pt"}):
        expected, ours = tmp_path / "expected.safetensors", tmp_path / "ours.safetensors"
        save_file(tensors, str(expected), metadata=metadata)
        write_safetensors(ours, {k: LazyTensor.of(v) for k, v in tensors.items()}, metadata)
        assert ours.read_bytes() == expected.read_bytes()


def test_a_tensor_unlike_its_description_is_an_error(tmp_path: Path):
    wrong = LazyTensor(torch.Size([2, 3]), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"tensor w: produced \(3, 2\) torch.float32, described as \(2, 3\)"):
        write_safetensors(tmp_path / "x.safetensors", {"w": wrong})


def previous_export(state_dict: dict[str, torch.Tensor], args, out: Path, max_shard_bytes: int) -> None:
    """The export as it was before the writer: every tensor in memory, shards cut in state-dict order,
    each written with save_file (the oracle of the byte-for-byte comparison)."""
    out.mkdir()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = higgs_audio_tiny()
    apply_lora(model, ["q_proj", "v_proj", "mlp", "audio_mlp"], rank=4, alpha=8.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_()  # lora_b starts at zero: make the merge change the weights
    return model


@pytest.mark.parametrize("max_shard_bytes", [200_000, 5 * 1024**3], ids=["sharded", "one_file"])
def test_streamed_lora_export_equals_the_merged_in_memory_export_bit_for_bit(tmp_path: Path, max_shard_bytes):
    model = lora_model()
    previous_export(merged_state_dict(model), model.args, tmp_path / "previous", max_shard_bytes)
    export = save_hf_checkpoint(
        merged_tensors(model), model.args, tmp_path / "streamed", max_shard_bytes=max_shard_bytes
    )
    weights = sorted(p.name for p in export.glob("*.safetensors"))
    assert weights == sorted(p.name for p in (tmp_path / "previous").glob("*.safetensors"))
    assert (len(weights) > 1) == (max_shard_bytes == 200_000)
    for name in [*weights, *([INDEX_FILE] if len(weights) > 1 else [])]:
        assert (export / name).read_bytes() == (tmp_path / "previous" / name).read_bytes(), name
    # The merge really happened: the exported q_proj differs from the base weight.
    exported = {k: v for shard in weights for k, v in load_file(export / shard).items()}
    base = model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(exported["layers.0.self_attn.q_proj.weight"], base)


def test_streamed_export_holds_one_merged_tensor_at_a_time(tmp_path: Path):
    """Each merged weight is computed when the writer reaches it and freed once written."""
    model = lora_model()
    alive: list[weakref.ref] = []
    most_alive = 0

    def tracked(spec: LazyTensor) -> LazyTensor:
        def materialize() -> torch.Tensor:
            nonlocal most_alive
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            tensor = spec.materialize()
            alive.append(weakref.ref(tensor))
            return tensor

        return LazyTensor(spec.shape, spec.dtype, materialize)

    tensors = {k: tracked(v) if isinstance(v, LazyTensor) else v for k, v in merged_tensors(model).items()}
    assert len(alive) == 0  # nothing merged before the export asks for it
    save_hf_checkpoint(tensors, model.args, tmp_path / "export")
    assert len(alive) == sum(isinstance(v, LazyTensor) for v in tensors.values()) > 0
    assert most_alive == 0  # when a merge starts, every earlier merged tensor is gone
