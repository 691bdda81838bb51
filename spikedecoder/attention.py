"""Causal self-attention: spiking (Spikformer SSA made causal, no softmax) and the ANN's softmax attention.

Both take (T, B, S, E) and an optional per-layer decoding `state` (a dict owned by the caller's cache): with it,
x holds only the new tokens, and the layer reads and extends what it kept from the earlier ones.

Spiking attention has no softmax, so its causal output is a running sum (SPEC section 6):
    y_i = sum_{j<=i} (q_i . k_j) v_j = q_i S_i,   S_i = S_{i-1} + k_i^T v_i   (d_h x d_h spike counts).
Counts are small integers, exact in float32, so the incremental result equals the full one bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SpikeDecoderConfig
from .energy_places import energy_scope
from .layers import Linear, LinearNorm, make_lif
from .norms import LayerNorm, make_norm


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(..., S, E) -> (..., H, S, d_h)"""
    *lead, s, e = x.shape
    return x.reshape(*lead, s, n_head, e // n_head).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """(..., H, S, d_h) -> (..., S, E)"""
    *lead, h, s, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, s, h * d)


def causal_mask(s: int, past: int, device: torch.device, window: int | tuple[int, ...] | None = None) -> Tensor:
    """(S, past+S) boolean: query i (at absolute position past+i) sees keys 0..past+i, or only the last `window`;
    a window per head gives (H, S, past+S)."""
    mask = torch.ones(s, past + s, dtype=torch.bool, device=device).tril(past)
    if window is None:
        return mask
    if isinstance(window, int):
        return mask.triu(past - window + 1)
    return torch.stack([mask.triu(past - w + 1) for w in window])


class SpikingSelfAttention(nn.Module):
    """x -> LIF (unless x is already spikes) -> Q, K, V = LIF(Norm(Linear(x))) -> scale * causal(Q K^T) V
    -> LIF -> Linear -> Norm. With `binary_scores` (spiking residual degree 2) the score map is itself passed
    through a LIF, so A V multiplies two binary operands; decoding then keeps K and V instead of the running sum.

    Energy places (energy_places.py): Q K^T and its mask are `scores`, A V and the scaling `values`."""

    energy_group = "attention"

    def __init__(self, cfg: SpikeDecoderConfig, input_spikes: bool, output_lif: bool = False):
        super().__init__()
        e = cfg.n_embd
        self.n_head = cfg.n_head
        self.scale = cfg.scale
        self.in_lif = None if input_spikes else make_lif(cfg, e)
        self.q, self.k, self.v = (LinearNorm(e, e, cfg.norm, cfg.bias) for _ in range(3))
        self.q.energy_place = self.k.energy_place = self.v.energy_place = "qkv"
        self.q_lif, self.k_lif, self.v_lif = (make_lif(cfg, e) for _ in range(3))
        self.binary_scores = cfg.residual == 2
        self.window = tuple(cfg.attn_window) if isinstance(cfg.attn_window, list) else cfg.attn_window
        self.max_window = max(self.window) if isinstance(self.window, tuple) else self.window
        self.score_lif = make_lif(cfg) if self.binary_scores else None
        self.av_norm = make_norm(cfg.norm, e) if cfg.av_norm else None
        self.attn_lif = make_lif(cfg, e)
        self.proj = LinearNorm(e, e, cfg.norm, cfg.bias)
        self.proj.energy_place = "proj"
        self.out_lif = make_lif(cfg, e) if output_lif else None

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        if self.in_lif is not None:
            x = self.in_lif(x)
        q = split_heads(self.q_lif(self.q(x)), self.n_head)  # (T, B, H, S, d_h) spikes
        k = split_heads(self.k_lif(self.k(x)), self.n_head)
        v = split_heads(self.v_lif(self.v(x)), self.n_head)
        if self.binary_scores or self.window is not None:
            y = self._cached_scores(q, k, v, state)
        else:
            y = self._running_sum(q, k, v, state)
        with energy_scope("values"):
            y = merge_heads(y) * self.scale
        if self.av_norm is not None:
            y = self.av_norm(y)
        y = self.attn_lif(y)
        y = self.proj(y)
        return self.out_lif(y) if self.out_lif is not None else y

    def _running_sum(self, q: Tensor, k: Tensor, v: Tensor, state: dict | None) -> Tensor:
        s = q.shape[-2]
        with energy_scope("scores"):
            scores = (q @ k.transpose(-1, -2)) * causal_mask(s, 0, q.device)  # coincidence counts, future zeroed
        with energy_scope("values"):
            y = scores @ v
            if state is not None:
                past = state.get("kv")
                if past is not None:
                    y = y + q @ past
                chunk = k.transpose(-1, -2) @ v
                state["kv"] = chunk if past is None else past + chunk
        return y

    def _cached_scores(self, q: Tensor, k: Tensor, v: Tensor, state: dict | None) -> Tensor:
        """Explicit score map over cached keys: for binary scores (degree 2) and for a sliding window (one for all
        heads, or one per head), where decoding keeps only the last window-1 keys and values (O(window) per token,
        still exact)."""
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=-2), torch.cat([state["v"], v], dim=-2)
            keep = k.shape[-2] if self.window is None else self.max_window - 1
            state["k"], state["v"] = k[..., k.shape[-2] - keep :, :], v[..., v.shape[-2] - keep :, :]
        past = k.shape[-2] - q.shape[-2]
        with energy_scope("scores"):
            scores = (q @ k.transpose(-1, -2)) * causal_mask(q.shape[-2], past, q.device, self.window)
            if self.binary_scores:
                scores = self.score_lif(scores * self.scale)
        with energy_scope("values"):
            return scores @ v


class SoftmaxAttention(nn.Module):
    """The ANN's pre-LayerNorm causal softmax attention with 1/sqrt(d_h) scaling; decoding keeps a KV cache.
    The fused kernel's two products are charged to `scores` and `values` by the energy counter."""

    energy_group = "attention"

    def __init__(self, cfg: SpikeDecoderConfig):
        super().__init__()
        e = cfg.n_embd
        self.n_head = cfg.n_head
        self.ln = LayerNorm(e)
        self.qkv = Linear(e, 3 * e, bias=cfg.bias)
        self.proj = Linear(e, e, bias=cfg.bias)
        self.qkv.energy_place, self.proj.energy_place = "qkv", "proj"
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(self.ln(x)).chunk(3, dim=-1))
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=-2), torch.cat([state["v"], v], dim=-2)
            state["k"], state["v"] = k, v
        s, past = q.shape[-2], k.shape[-2] - q.shape[-2]
        mask = causal_mask(s, past, x.device)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1 / math.sqrt(q.shape[-1]))
        return F.dropout(self.proj(merge_heads(y)), drop, self.training)
