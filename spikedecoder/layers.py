"""Linear layers shared by every block: batch-invariant when asked, Linear+Norm pairs that fold at inference, and
the two causal convolutions over the last few tokens: the token shift that widens a Linear's input (conv_mode
"full") and the per-channel convolution of a Linear's outputs (conv_mode "channel")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SpikeDecoderConfig
from .neurons import LIF
from .norms import foldable, make_norm

_ROWS = 16  # fixed GEMM height in batch-invariant mode
_batch_invariant = False


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Make every Linear compute each row with the same kernel shape, so a token's output is bitwise independent
    of how many tokens share the call. Incremental decoding is then exactly equal to recomputing the window
    (a plain GEMM reorders its float sums with the matrix height)."""
    global _batch_invariant
    previous, _batch_invariant = _batch_invariant, enabled
    try:
        yield
    finally:
        _batch_invariant = previous


def _rowwise_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    padded = torch.cat([rows, rows.new_zeros((-n) % _ROWS, rows.shape[1])])
    out = torch.cat([F.linear(chunk, weight, bias) for chunk in padded.split(_ROWS)])[:n]
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if _batch_invariant:
            return _rowwise_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class LinearNorm(nn.Module):
    """Linear followed by a normalisation; BatchNorm/PowerNorm fold into the Linear for inference."""

    def __init__(self, fan_in: int, fan_out: int, norm: str, bias: bool = True):
        super().__init__()
        self.linear = Linear(fan_in, fan_out, bias=bias or norm in ("batch", "power"))
        self.norm = make_norm(norm, fan_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.linear(x))

    @torch.no_grad()
    def fold(self) -> bool:
        """Merge an eval-mode BatchNorm/PowerNorm into the Linear; returns whether anything was folded."""
        if not foldable(self.norm):
            return False
        a, c = self.norm.affine_map()
        self.linear.weight.mul_(a[:, None])
        self.linear.bias.mul_(a).add_(c)
        self.norm = nn.Identity()
        return True


# Where each LIF sits; True where its spikes only feed a Linear, so it takes the config's spike_levels and bipolar
# settings. Q, K and V take qkv_levels (never bipolar: their products count coincidences); the score map and a
# spiking residual stream stay binary.
STAGES = {
    "attn_in": True,
    "qkv": False,
    "scores": False,
    "attn_out": True,
    "first_attn_out": True,
    "mlp_in": True,
    "mlp_hidden": True,
    "head": True,
    "residual": False,
}


class FloatStage(nn.Module):
    """A stage computed in float instead of spikes (`float_stages`, a diagnostic): relu of the current, one-sided
    like spikes but neither quantised nor bounded, so training it shows what spiking that stage costs."""

    energy_place = "lif"

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


def make_lif(cfg: SpikeDecoderConfig, channels: int | None, stage: str) -> LIF | FloatStage:
    """The neuron of one spiking stage (STAGES) with the model's neuron settings. A LIF without a channel axis (the
    score map of degree-2 attention, whose last axis is the key position) learns one threshold per layer where the
    config asks for one per channel; so does a learned decay."""
    if stage in cfg.float_stages:
        return FloatStage()
    graded = STAGES[stage]
    levels = cfg.qkv_levels if stage == "qkv" else cfg.spike_levels if graded else 1
    threshold, decay = cfg.learnable_threshold, cfg.learnable_tau
    if channels is None:
        threshold = "layer" if threshold == "channel" else threshold
        decay = "layer" if decay == "channel" else decay
    return LIF(
        tau=cfg.tau,
        v_threshold=cfg.v_threshold,
        decay_input=cfg.decay_input,
        surrogate=cfg.surrogate,
        alpha=cfg.surrogate_alpha,
        learnable_threshold=threshold,
        channels=channels,
        backend=cfg.lif_backend,
        levels=levels,
        bipolar=cfg.bipolar and graded,
        learnable_tau=decay,
    )


def with_past(x: Tensor, width: int, state: dict | None, key: str) -> tuple[Tensor, bool]:
    """x (T, ..., S, C) with the last width-1 rows of the earlier calls before it (zeros before the first token):
    (..., width-1 + S, C), and whether x was identical at every step (a stride-0 T axis: then one step is returned,
    for the caller to expand). The last width-1 rows go back to `state[key]` for every step, so a later call whose
    input varies over T finds them: the memory of both causal convolutions, TokenShift and ChannelConv."""
    steps, keep = x.shape[0], width - 1
    invariant = steps > 1 and x.stride(0) == 0
    if invariant:
        x = x[:1]
    past = state.get(key) if state is not None else None
    past = x.new_zeros(*x.shape[:-2], keep, x.shape[-1]) if past is None else past[: x.shape[0]]
    seq = torch.cat([past, x], dim=-2)
    if state is not None:
        last = seq[..., seq.shape[-2] - keep :, :]
        state[key] = last.expand(steps, *last.shape[1:])
    return seq, invariant


class TokenShift(nn.Module):
    """[x_i, x_{i-1}, ..., x_{i-K+1}] on the feature axis (zeros before the first token), so that the Linear reading
    it is a causal convolution of width K over tokens: the short convolutions of H3 and Mamba, RWKV's token shift
    (K = 2) made a full Linear. On spikes the Linear still only accumulates (its input is the K tokens' spikes).

    Decoding keeps the last K-1 inputs in `state[key]`, so the step equals the full forward. An input identical at
    every timestep (a stride-0 T axis: the direct-encoded embedding) stays so, and the Linear on it is still computed
    (and charged) once, not T times."""

    def __init__(self, width: int, key: str):
        super().__init__()
        self.width, self.key = width, key

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        if self.width == 1:
            return x
        seq, invariant = with_past(x, self.width, state, self.key)
        keep, s = self.width - 1, seq.shape[-2] - (self.width - 1)
        out = torch.cat([seq[..., keep - j : keep - j + s, :] for j in range(self.width)], dim=-1)
        return out.expand(x.shape[0], *out.shape[1:]) if invariant else out

    def extra_repr(self) -> str:
        return f"width={self.width}"


class ChannelConv(nn.Module):
    """y_i = sum_j taps[j] * z_{i-j} over j < K, channel by channel (zeros before the first token): a causal
    depthwise convolution of a Linear's outputs over tokens, the short convolution of H3 and Mamba. The Linear
    before it reads one token, so its weights are read, and on spikes accumulated, once per token instead of K
    times (TokenShift); the mixing costs K multiplies and K-1 adds per channel, float by float.

    Decoding keeps the last K-1 outputs in `state[key]`; the full forward and the step run the same multiplies and
    adds in the same order, so they agree bit for bit. The taps start at 1 for the token itself and 0.5 for the
    ones before it (the neighbourhood present from the first step); weight decay leaves them alone (optim.py)."""

    def __init__(self, width: int, channels: int, key: str, place: str):
        super().__init__()
        self.width, self.key = width, key
        self.energy_place = place  # priced with the Linear it mixes (qkv, fc1)
        self.taps = nn.Parameter(torch.cat([torch.ones(1, channels), torch.full((width - 1, channels), 0.5)]))

    def forward(self, z: Tensor, state: dict | None = None) -> Tensor:
        seq, invariant = with_past(z, self.width, state, self.key)
        keep, s = self.width - 1, seq.shape[-2] - (self.width - 1)
        y = seq[..., keep:, :] * self.taps[0]
        for j in range(1, self.width):
            y = y + seq[..., keep - j : keep - j + s, :] * self.taps[j]
        return y.expand(z.shape[0], *y.shape[1:]) if invariant else y

    def extra_repr(self) -> str:
        return f"width={self.width}, channels={self.taps.shape[1]}"


def token_convs(
    cfg: SpikeDecoderConfig, width: int, channels: int, key: str, place: str
) -> tuple[int, ChannelConv | None]:
    """How a Linear of `channels` outputs takes the last `width` tokens under cfg.conv_mode: (the tokens its input
    holds, the convolution of its outputs or None)."""
    if width == 1 or cfg.conv_mode == "full":
        return width, None
    return 1, ChannelConv(width, channels, key, place)
