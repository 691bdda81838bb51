"""Feed-forward sub-blocks: the spiking MLP and the ANN's GELU MLP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import SpikeDecoderConfig
from .layers import Linear, LinearNorm, TokenShift, make_lif, token_convs
from .norms import LayerNorm


class SpikingMLP(nn.Module):
    """LIF (unless x is already spikes) -> Linear(E, rE) -> Norm -> LIF -> Linear(rE, E) -> Norm. With mlp_conv = K
    the first Linear reads the last K tokens' spikes (a causal convolution; decoding keeps K-1 of them)."""

    energy_group, energy_own = "mlp", "act"

    def __init__(self, cfg: SpikeDecoderConfig, input_spikes: bool):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.n_embd
        self.in_lif = None if input_spikes else make_lif(cfg, cfg.n_embd, "mlp_in")
        reads, self.fc1_conv = token_convs(cfg, cfg.mlp_conv, hidden, "fc1_conv", "fc1")
        self.shift = TokenShift(reads, "mlp_shift")
        self.fc1 = LinearNorm(reads * cfg.n_embd, hidden, cfg.norm, cfg.bias)
        self.hidden_lif = make_lif(cfg, hidden, "mlp_hidden")
        self.fc2 = LinearNorm(hidden, cfg.n_embd, cfg.norm, cfg.bias)
        self.fc1.energy_place, self.fc2.energy_place = "fc1", "fc2"

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        if self.in_lif is not None:
            x = self.in_lif(x)
        h = self.fc1(self.shift(x, state))
        if self.fc1_conv is not None:
            h = self.fc1_conv(h, state)
        return self.fc2(self.hidden_lif(h))


class GeluMLP(nn.Module):
    """The ANN's pre-LayerNorm MLP (fc1 on the last mlp_conv tokens, as in the spiking MLP)."""

    energy_group, energy_own = "mlp", "act"  # the GELU is `act`

    def __init__(self, cfg: SpikeDecoderConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.n_embd
        self.ln = LayerNorm(cfg.n_embd)
        reads, self.fc1_conv = token_convs(cfg, cfg.mlp_conv, hidden, "fc1_conv", "fc1")
        self.shift = TokenShift(reads, "mlp_shift")
        self.fc1 = Linear(reads * cfg.n_embd, hidden, bias=cfg.bias)
        self.fc2 = Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.fc1.energy_place, self.fc2.energy_place = "fc1", "fc2"
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        h = self.fc1(self.shift(self.ln(x), state))
        h = F.gelu(h if self.fc1_conv is None else self.fc1_conv(h, state))
        return F.dropout(self.fc2(h), self.dropout, self.training)
