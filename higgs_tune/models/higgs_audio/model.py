"""Higgs Audio v2: the model math, in plain PyTorch (docs/higgs_audio_v2.md §2-§3).

Llama-3 backbone whose decoder layers have a second ("audio") pair of RMSNorms and SwiGLU FFN for
audio positions (DualFFN), one shared attention, summed codebook embeddings and two untied heads.
Nothing here knows about compile, FSDP, activation checkpointing or LoRA: those are applied from
outside. Module and parameter names equal Boson's ``HiggsAudioModel`` state dict (docs/higgs_audio_v2.md §2), so the HF
checkpoint adapter is the identity on key names.

Shapes: B batch rows, L positions per row, H hidden, V text vocabulary, K codebooks,
C = codebook_size + 2 per-codebook vocabulary, nh / nkv query / key-value heads, D head dim.

The input is the packed batch of ``higgs_tune/data/batch.py`` (audio already merged into the sequence,
one position per audio column). The step is a pure tensor program over fixed shapes: no boolean-mask
indexing, no ``.item()``, no data-dependent Python branches. FFN routing and the heads use the
sink-padded index tensors of the batch: gather the positions of one kind (plus a zero sink row at
position L), run the module on that list only, scatter back, drop the sink.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from higgs_tune.data.batch import append_sink
from higgs_tune.models.kv_cache import KVCache, LayerKVCache

from .config import HiggsAudioModelArgs

# Attention mask of one kind of layer: a boolean [B, 1, L, L] tensor (SDPA, True = may attend) or a
# flex_attention BlockMask.
AttentionMask = torch.Tensor | BlockMask


@dataclass
class HiggsAudioOutput:
    """Logits of a forward pass, in the model dtype (the loss upcasts).

    Training (:meth:`HiggsAudioModel.forward`): ``text_logits`` [B, C_tt, V] at ``text_target_index``
    (None when not asked for), ``audio_logits`` [B, C_at, K, C] at ``audio_target_index`` (sink entries
    give logits of a zero row).
    Evaluation (:meth:`HiggsAudioModel.forward_full`): [B, L, V] and [B, L, K, C] at every position.
    """

    text_logits: torch.Tensor | None
    audio_logits: torch.Tensor


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inverse_frequencies(
    head_dim: int, theta: float, rope_scaling: dict[str, Any] | None
) -> torch.Tensor:
    """Llama-3 RoPE inverse frequencies, as transformers computes them (docs/higgs_audio_v2.md §3.6).

    Returns:
        [D / 2] float32.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_scaling is None:
        return inv_freq
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a batch (HF ``rotate_half`` layout: halves duplicated)."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict[str, Any] | None):
        super().__init__()
        self.head_dim, self.theta, self.rope_scaling = head_dim, theta, rope_scaling
        self.register_buffer(
            "inv_freq", rope_inverse_frequencies(head_dim, theta, rope_scaling), persistent=False
        )

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recompute ``inv_freq`` (after a meta-device build, ``to_empty`` or ``load_state_dict(assign=True)``)."""
        device = self.inv_freq.device if device is None else torch.device(device)
        if device.type == "meta":
            raise ValueError("RotaryEmbedding.reset_parameters needs a real device, got meta")
        self.inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.rope_scaling).to(device)

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .to_empty / .half pass through here: keep inv_freq exact fp32 on the new
        # device (a model.to(bfloat16) would otherwise round the frequencies, to_empty leave garbage).
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.reset_parameters()
        return self

    def forward(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """input_pos [B, L] -> (cos, sin), each [B, L, D] in ``dtype`` (computed in fp32)."""
        freqs = input_pos.float()[..., None] * self.inv_freq.float()  # [B, L, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [B, L, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, D], cos/sin [B, L, D] -> [B, heads, L, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """LlamaRMSNorm: normalise in fp32, cast back, scale by ``weight`` [H]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU FFN (LlamaMLP): down_proj(silu(gate_proj(x)) * up_proj(x)); [..., H] -> [..., H]."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (HF layout of q/k/v/o weights)."""

    def __init__(self, args: HiggsAudioModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x [B, L, H], cos/sin [B, L, D], mask (see :data:`AttentionMask`) -> [B, L, H].

        With ``kv_cache`` (generation), this forward's keys/values are stored in it and the queries attend
        over all its T slots: ``mask`` is then [B, 1, L, T] (:meth:`KVCache.begin_forward`)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)  # [B, L, nh, D]
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)  # [B, L, nkv, D]
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: [B, heads, L, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # [B, nkv, T, D]
        scale = 1.0 / math.sqrt(self.head_dim)
        if isinstance(mask, BlockMask):
            out = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
        else:
            # query head i reads kv head i // group (HF repeat_kv)
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)  # [B, nh, L, D]
            v = v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)  # [B, L, nh*D]
        return self.o_proj(out)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L+1, H] (sink row appended), index [B, C] in 0..L -> [B, C, H]."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_positions(update: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add values [B, C, H] into update [B, L+1, H] at index [B, C] (sink entries pile up in row L)."""
    return update.scatter_add(1, index[..., None].expand(-1, -1, values.shape[-1]), values)


# -------------------------------------------------------------------------------------- decoder layer
LAYER_KINDS = ("dual_ffn", "fast_forward", "text_only")


class DecoderLayer(nn.Module):
    """One decoder layer of Higgs Audio (docs/higgs_audio_v2.md §3.4). ``kind``:

    - ``"dual_ffn"`` (HiggsAudioDualFFNDecoderLayer): audio positions (audio-in and audio-out columns)
      use ``audio_input_layernorm`` / ``audio_post_attention_layernorm`` / ``audio_mlp``, text positions
      the text ones; attention is shared. Each FFN runs only on its own index list.
    - ``"fast_forward"`` (Boson's fast-forward DualFFN layer): a Llama block for text positions in which
      audio positions are neither queries nor keys; the output at audio positions is the layer input.
    - ``"text_only"`` (LlamaDecoderLayer of the ``dual_ffn`` / ``stack`` adapters): a Llama block for
      every position.
    """

    def __init__(self, args: HiggsAudioModelArgs, kind: str):
        super().__init__()
        if kind not in LAYER_KINDS:
            raise ValueError(f"layer kind {kind!r} is not one of {LAYER_KINDS}")
        self.kind = kind
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if kind == "dual_ffn":
            self.audio_mlp = FeedForward(args.hidden_size, args.intermediate_size)
            self.audio_input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            self.audio_post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: AttentionMask,
        fast_forward_mask: AttentionMask | None,
        audio_mask: torch.Tensor,
        text_ffn_index: torch.Tensor,
        audio_ffn_index: torch.Tensor,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: [B, L, H] residual stream.
            cos, sin: [B, L, D] RoPE tables.
            attention_mask: block-causal mask over documents.
            fast_forward_mask: the same without audio positions (fast-forward layers; None if none exist).
            audio_mask: [B, L, 1] bool, audio-in or audio-out column.
            text_ffn_index: [B, C_text] positions on the text FFN path (sink = L).
            audio_ffn_index: [B, C_audio] positions on the audio FFN path (sink = L).
            kv_cache: generation only: this layer's cache (the masks are then over its slots).

        Returns:
            [B, L, H].
        """
        length = x.shape[1]
        if self.kind == "text_only":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, kv_cache)
            return x + self.mlp(self.post_attention_layernorm(x))

        if self.kind == "fast_forward":
            h = x + self.self_attn(self.input_layernorm(x), cos, sin, fast_forward_mask, kv_cache)
            h_sink = append_sink(h)  # [B, L+1, H]
            text_out = self.mlp(self.post_attention_layernorm(gather_positions(h_sink, text_ffn_index)))
            h = h + scatter_positions(torch.zeros_like(h_sink), text_ffn_index, text_out)[:, :length]
            return torch.where(audio_mask, x, h)  # audio positions skip the layer

        normed = torch.where(audio_mask, self.audio_input_layernorm(x), self.input_layernorm(x))
        h = x + self.self_attn(normed, cos, sin, attention_mask, kv_cache)  # [B, L, H]
        h_sink = append_sink(h)  # [B, L+1, H]
        text_out = self.mlp(self.post_attention_layernorm(gather_positions(h_sink, text_ffn_index)))
        audio_out = self.audio_mlp(
            self.audio_post_attention_layernorm(gather_positions(h_sink, audio_ffn_index))
        )
        update = scatter_positions(torch.zeros_like(h_sink), text_ffn_index, text_out)
        update = scatter_positions(update, audio_ffn_index, audio_out)
        return h + update[:, :length]


class AudioDecoderProjector(nn.Module):
    """The two output heads (Boson's ``audio_decoder_proj``): ``text_lm_head`` [V, H] (untied) and
    ``audio_lm_head`` [K*C, H] (codebook-major: row k*C + code)."""

    def __init__(self, hidden_size: int, vocab_size: int, audio_vocab: int):
        super().__init__()
        self.text_lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.audio_lm_head = nn.Linear(hidden_size, audio_vocab, bias=False)


# ------------------------------------------------------------------------------------------- masks
def _batch_field(batch: Any, name: str) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if name not in batch:
            raise KeyError(f"batch has no field {name!r} (fields: {sorted(batch)})")
        return batch[name]
    if not hasattr(batch, name):
        raise AttributeError(f"batch of type {type(batch).__name__} has no field {name!r}")
    return getattr(batch, name)


def sdpa_masks(
    doc_ids: torch.Tensor, audio_mask: torch.Tensor, with_fast_forward: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean SDPA masks (True = may attend).

    Args:
        doc_ids: [B, L] document id per position.
        audio_mask: [B, L] bool, audio-in or audio-out column.
        with_fast_forward: also build the fast-forward mask.

    Returns:
        block-causal mask [B, 1, L, L]; fast-forward mask [B, 1, L, L] (block-causal, text queries see
        text keys only, audio queries see only themselves so no row is empty) or None.
    """
    length = doc_ids.shape[1]
    positions = torch.arange(length, device=doc_ids.device)
    causal = positions[None, :] <= positions[:, None]  # [L(q), L(k)]
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # [B, L, L]
    fast_forward = None
    if with_fast_forward:
        text = ~audio_mask
        diagonal = positions[None, :] == positions[:, None]
        fast_forward = (allowed & ((text[:, :, None] & text[:, None, :]) | diagonal))[:, None]
    return allowed[:, None], fast_forward


def flex_block_masks(
    doc_ids: torch.Tensor, audio_mask: torch.Tensor, with_fast_forward: bool
) -> tuple[BlockMask, BlockMask | None]:
    """The masks of :func:`sdpa_masks` as flex_attention BlockMasks (same arguments)."""
    batch, length = doc_ids.shape

    def block_causal(b, h, q, k):
        return (doc_ids[b, q] == doc_ids[b, k]) & (q >= k)

    def fast_forward(b, h, q, k):
        text_pair = ~audio_mask[b, q] & ~audio_mask[b, k]
        return block_causal(b, h, q, k) & (text_pair | (q == k))

    device = doc_ids.device
    dense = create_block_mask(block_causal, batch, None, length, length, device=device)
    ff = (
        create_block_mask(fast_forward, batch, None, length, length, device=device)
        if with_fast_forward
        else None
    )
    return dense, ff


# ------------------------------------------------------------------------------------------- model
class HiggsAudioModel(nn.Module):
    """Higgs Audio v2 over a packed batch (``higgs_tune/data/batch.py``).

    Parameters (Boson's names): ``embed_tokens`` [V, H] (padding_idx = pad id), ``layers.N.*``,
    ``norm``, ``audio_codebook_embeddings`` [K*C, H], ``audio_decoder_proj.{text,audio}_lm_head``.
    """

    def __init__(self, args: HiggsAudioModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(args, kind) for kind in args.layer_kinds())
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        audio_vocab = args.num_codebooks * args.codebook_vocab_size
        self.audio_decoder_proj = AudioDecoderProjector(args.hidden_size, args.vocab_size, audio_vocab)
        self.audio_codebook_embeddings = nn.Embedding(audio_vocab, args.hidden_size)
        self.has_fast_forward_layers = any(layer.kind == "fast_forward" for layer in self.layers)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init as Boson's ``_init_weights``: Linear/Embedding N(0, std), pad row 0, norms 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.rotary_emb.reset_parameters()

    # ----------------------------------------------------------------------------- pieces
    def embed(
        self, tokens: torch.Tensor, audio_codes: torch.Tensor, audio_mask: torch.Tensor
    ) -> torch.Tensor:
        """Text embedding at text positions, sum (or mean) of the K offset codebook embeddings at audio
        positions (docs/higgs_audio_v2.md §3.1-3.2; offset stride C = codebook_size + 2).

        Args:
            tokens: [B, L]; audio_codes: [B, K, L] in 0..C-1; audio_mask: [B, L] bool.

        Returns:
            [B, L, H].
        """
        text = self.embed_tokens(tokens)  # [B, L, H]
        num_codebooks, stride = audio_codes.shape[1], self.args.codebook_vocab_size
        # One embedding lookup per codebook, accumulated in fp32 (as torch.sum over codebooks does):
        # no [B, K, L, H] tensor, and autograd keeps only the ids.
        audio = torch.zeros_like(text, dtype=torch.float32)  # [B, L, H]
        for k in range(num_codebooks):
            audio = audio + self.audio_codebook_embeddings(audio_codes[:, k] + k * stride).float()
        if self.args.audio_embed_avg:
            audio = audio / num_codebooks
        return torch.where(audio_mask[..., None], audio.to(text.dtype), text)

    def attention_masks(
        self, doc_ids: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[AttentionMask, AttentionMask | None]:
        """Block-causal mask over ``doc_ids`` [B, L] and, if the model has fast-forward layers, the same
        with audio positions ([B, L] bool) removed (see :func:`sdpa_masks`)."""
        build = flex_block_masks if self.args.attention == "flex" else sdpa_masks
        return build(doc_ids, audio_mask, self.has_fast_forward_layers)

    def hidden_states(self, batch: Any, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The residual stream after the last decoder layer, before the final norm: [B, L, H].

        ``kv_cache`` (generation, :mod:`higgs_tune.models.kv_cache`): every row holds one sequence, the
        batch's ``input_pos`` are its cache slots, ``doc_ids`` are not read; keys/values are stored in
        the cache and attention reads all earlier positions from it."""
        tokens = _batch_field(batch, "tokens")
        audio_mask = _batch_field(batch, "audio_in_mask") | _batch_field(batch, "audio_out_mask")  # [B, L]
        x = self.embed(tokens, _batch_field(batch, "audio_codes"), audio_mask)
        input_pos = _batch_field(batch, "input_pos")
        cos, sin = self.rotary_emb(input_pos, x.dtype)
        if kv_cache is None:
            doc_ids = _batch_field(batch, "doc_ids")
            attention_mask, fast_forward_mask = self.attention_masks(doc_ids, audio_mask)
        else:
            attention_mask, fast_forward_mask = kv_cache.begin_forward(
                input_pos, audio_mask, self.has_fast_forward_layers
            )
        text_ffn_index = _batch_field(batch, "text_ffn_index")
        audio_ffn_index = _batch_field(batch, "audio_ffn_index")
        audio_mask = audio_mask[..., None]  # [B, L, 1]
        for index, layer in enumerate(self.layers):
            layer_cache = None if kv_cache is None else kv_cache.layer(index, input_pos)
            x = layer(
                x,
                cos,
                sin,
                attention_mask,
                fast_forward_mask,
                audio_mask,
                text_ffn_index,
                audio_ffn_index,
                layer_cache,
            )
        return x

    def new_kv_cache(self, batch_size: int, max_positions: int) -> KVCache:
        """An empty generation cache for this model's attention, on its device and in its dtype."""
        weight = self.embed_tokens.weight
        args = self.args
        return KVCache(
            args.num_layers,
            args.num_kv_heads,
            args.head_dim,
            batch_size,
            max_positions,
            weight.device,
            weight.dtype,
        )

    def text_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + text head: [..., H] -> [..., V]."""
        return self.audio_decoder_proj.text_lm_head(self.norm(hidden))

    def audio_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + audio head: [..., H] -> [..., K, C]."""
        logits = self.audio_decoder_proj.audio_lm_head(self.norm(hidden))
        return logits.unflatten(-1, (self.args.num_codebooks, self.args.codebook_vocab_size))

    # ----------------------------------------------------------------------------- entries
    def forward(self, batch: Any, text_logits: bool = True) -> HiggsAudioOutput:
        """Training forward: logits only where targets can exist.

        Args:
            text_logits: compute the text head (False: ``text_logits`` is None, for a loss without a
                text term: the [C_tt, V] matmul and its backward are not run).

        Returns:
            text_logits [B, C_tt, V] at ``text_target_index`` (or None); audio_logits [B, C_at, K, C] at
            ``audio_target_index`` (model dtype).
        """
        hidden = append_sink(self.hidden_states(batch))  # [B, L+1, H]
        audio_hidden = gather_positions(hidden, _batch_field(batch, "audio_target_index"))  # [B, C_at, H]
        text = None
        if text_logits:
            text_hidden = gather_positions(hidden, _batch_field(batch, "text_target_index"))  # [B, C_tt, H]
            text = self.text_head(text_hidden)
        return HiggsAudioOutput(text, self.audio_head(audio_hidden))

    def forward_full(self, batch: Any) -> HiggsAudioOutput:
        """Evaluation/generation forward: text logits [B, L, V] and audio logits [B, L, K, C] at every
        position (the index fields of the batch other than the FFN routing are not used)."""
        hidden = self.hidden_states(batch)
        return HiggsAudioOutput(self.text_head(hidden), self.audio_head(hidden))
