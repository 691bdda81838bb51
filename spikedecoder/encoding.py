"""Text-to-spike embeddings (SPEC section 3): token and position codes, combined and presented for T timesteps.

Fixed codes are tables built once (never rebuilt per token); every code is distinct per id and per position
(`code_table` + `assert_unique`). Learned codes are float tables binarised by a Heaviside whose gradient is the
surrogate's, so they train end to end.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .codes import binary_code, count_unique, onehot_code, sinusoidal_code, unique_sinusoid_width
from .config import ConfigError, SpikeDecoderConfig
from .layers import Linear
from .surrogate import make_surrogate


def code_table(kind: str, n: int, width: int | None) -> Tensor:
    if kind == "onehot":
        return onehot_code(n)
    if kind == "binary":
        return binary_code(n)
    if kind == "sinusoidal":
        return sinusoidal_code(n, width or unique_sinusoid_width(n))
    raise ValueError(f"{kind!r} is not a fixed code")


def assert_unique(codes: Tensor, what: str, fix: str) -> None:
    distinct = count_unique(codes)
    if distinct != codes.shape[0]:
        raise ConfigError(f"{what}: only {distinct} distinct codes for {codes.shape[0]} entries; {fix}")


class _Code(nn.Module):
    """One code (token or position): a fixed {0,1} table, or a trained table (binarised when spiking)."""

    def __init__(self, kind: str, n: int, width: int | None, what: str, spiking: bool, surrogate: str):
        super().__init__()
        self.kind = kind
        if kind in ("learned", "float"):
            self.table = nn.Embedding(n, width)  # N(0, 1) init: sums of two are large enough to fire
            self.binarise = make_surrogate(surrogate) if spiking and kind == "learned" else None
            self.width = width
        else:
            codes = code_table(kind, n, width)
            assert_unique(
                codes,
                f"{what} code {kind!r}",
                "use a wider code_dim (or leave it unset) or a onehot/binary code",
            )
            self.register_buffer("codes", codes, persistent=False)
            self.binarise = None
            self.width = codes.shape[1]

    @property
    def is_fixed(self) -> bool:
        return self.kind not in ("learned", "float")

    def forward(self, ids: Tensor) -> Tensor:
        if self.is_fixed:
            return self.codes[ids]
        return self.table(ids)


class SpikeEmbedding(nn.Module):
    """Token ids (B, S) -> input current or spikes (T, B, S, E) for the first block.

    `emits_spikes` tells the first block whether its input is already binary (then it must not go through another
    LIF: with tau=2, v_th=1 a constant binary input never fires, SPEC section 2).
    """

    energy_group, energy_sealed = "embedding", True  # every op below, its LIFs included, is charged to `embedding`

    def __init__(self, cfg: SpikeDecoderConfig):
        super().__init__()
        self.cfg = cfg
        spiking = cfg.spike_embedding
        if cfg.combine == "sum":
            tok_w = pos_w = cfg.n_embd
        else:  # trained codes share the width; a sinusoid left at None gets its smallest unique width
            tok_w = cfg.code_dim or cfg.n_embd // 2
            pos_w = cfg.code_dim if cfg.position_code == "sinusoidal" else tok_w
        binarise = spiking and "embedding" not in cfg.float_stages  # float_stages: the learned code stays float
        self.token = _Code(cfg.token_code, cfg.vocab_size, tok_w, "token", binarise, cfg.surrogate)
        self.position = _Code(cfg.position_code, cfg.max_len, pos_w, "position", binarise, cfg.surrogate)
        width = self.token.width if cfg.combine == "sum" else self.token.width + self.position.width
        self.code_width = width
        self.in_proj = None
        if width != cfg.n_embd:
            self.in_proj = Linear(width, cfg.n_embd, bias=False)
            # a binary code drives the projection with few active bits: scale so that the first LIF fires
            active = self._expected_active_bits()
            nn.init.normal_(self.in_proj.weight, std=2.0 / math.sqrt(max(active, 1.0)))
        self.rate = cfg.encoding == "rate"
        # rate coding always emits Bernoulli spikes (after the projection, if any): a LIF on them would never fire
        self.emits_spikes = self.rate or (self.in_proj is None and spiking)

    def _expected_active_bits(self) -> float:
        total = 0.0
        for code in (self.token, self.position):
            total += float(code.codes.sum(1).mean()) if code.is_fixed else code.width / 2
        return total

    @torch.no_grad()
    def bake_spikes(self) -> int:
        """Inference only: each learned code that is binarised on its own (concatenated codes; a sum is binarised
        after the add) keeps its table's spikes instead of the floats, so a lookup needs no Heaviside: the same
        {0, 1} rows, one op fewer per code and token. Returns how many codes were baked."""
        baked = 0
        for code in (self.token, self.position) if self.cfg.combine != "sum" else ():
            if code.binarise is not None:
                code.table.weight.copy_(code.binarise(code.table.weight))
                code.binarise = None
                baked += 1
        return baked

    def code(self, idx: Tensor, start_pos: int = 0) -> Tensor:
        """The (B, S, code_width) code of each token at its position: spikes, or floats for the ANN."""
        positions = torch.arange(start_pos, start_pos + idx.shape[1], device=idx.device)
        tok, pos = self.token(idx), self.position(positions)[None].expand(idx.shape[0], -1, -1)
        if self.cfg.combine == "sum":
            x = tok + pos
            return self.token.binarise(x) if self.token.binarise is not None else x
        parts = [c.binarise(v) if c.binarise is not None else v for c, v in ((self.token, tok), (self.position, pos))]
        return torch.cat(parts, dim=-1)

    def forward(self, idx: Tensor, start_pos: int = 0) -> Tensor:
        x = self.code(idx, start_pos)
        if self.in_proj is not None:
            x = self.in_proj(x)
        x = x.unsqueeze(0).expand(self.cfg.timesteps, *x.shape)
        if self.rate:
            # Bernoulli spikes with the probability's gradient (straight-through estimator)
            p = x if self.cfg.spike_embedding and self.in_proj is None else torch.sigmoid(x)
            x = p + (torch.bernoulli(p.detach()) - p).detach()
        return x
