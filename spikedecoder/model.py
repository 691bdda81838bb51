"""SpikeDecoder: a GPT decoder whose embedding, attention, MLP and head are each ANN or spiking (SPEC section 5).

Tokens (B, S) -> embedding (T, B, S, E) -> n_layer blocks -> head -> logits (B, S, V). LIF neurons integrate over T
only, so tokens mix only through (causal) attention, which is what makes exact incremental decoding possible.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .attention import SoftmaxAttention, SpikingSelfAttention
from .checkpoint import load_model_files, save_model_files
from .config import SpikeDecoderConfig
from .encoding import SpikeEmbedding
from .inputs import check_token_ids
from .layers import Linear, LinearNorm, make_lif
from .mlp import GeluMLP, SpikingMLP
from .norms import LayerNorm


class Block(nn.Module):
    """x + attn(x), then + mlp(x); with a spiking residual (degree >= 1) a LIF follows each sum."""

    energy_own = "residual"  # the sums and their LIFs; energy_group (block{index}) is set per instance

    def __init__(self, cfg: SpikeDecoderConfig, index: int, input_spikes: bool):
        super().__init__()
        self.energy_group = f"block{index}"
        spike_stream = cfg.residual >= 1
        if cfg.attention == "spiking":
            self.attn = SpikingSelfAttention(cfg, input_spikes, output_lif=cfg.first_attn_lif and index == 0)
        else:
            self.attn = SoftmaxAttention(cfg)
        self.attn_sum_lif = make_lif(cfg, cfg.n_embd, "residual") if spike_stream else None
        self.mlp = SpikingMLP(cfg, input_spikes=spike_stream) if cfg.mlp == "spiking" else GeluMLP(cfg)
        self.mlp_sum_lif = make_lif(cfg, cfg.n_embd, "residual") if spike_stream else None
        for lif in (self.attn_sum_lif, self.mlp_sum_lif):
            if lif is not None:
                lif.energy_place = "residual"

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        x = x + self.attn(x, state)
        if self.attn_sum_lif is not None:
            x = self.attn_sum_lif(x)
        x = x + self.mlp(x, state)
        if self.mlp_sum_lif is not None:
            x = self.mlp_sum_lif(x)
        return x


class Head(nn.Module):
    """Combine the T steps and project to the vocabulary. On spikes the projection runs per step (accumulates
    only), then the step logits are combined; on floats the steps are combined first (one dense projection)."""

    energy_group = "head"

    def __init__(self, cfg: SpikeDecoderConfig, input_spikes: bool):
        super().__init__()
        self.combine = cfg.head_combine
        spiking = cfg.head == "spiking"
        self.ln = None if spiking else LayerNorm(cfg.n_embd)
        self.lif = make_lif(cfg, cfg.n_embd, "head") if spiking and cfg.head_lif and not input_spikes else None
        self.on_spikes = spiking and (cfg.head_lif or input_spikes)
        width = cfg.n_embd * cfg.timesteps if self.combine == "concat" else cfg.n_embd
        self.out = Linear(width, cfg.vocab_size, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.ln is not None:
            x = self.ln(x)
        if self.lif is not None:
            x = self.lif(x)
        if self.combine == "concat":
            return self.out(x.permute(1, 2, 0, 3).flatten(2))
        if self.combine == "last":
            return self.out(x[-1])
        reduce = torch.mean if self.combine == "mean" else torch.sum
        if self.on_spikes:
            return reduce(self.out(x), dim=0)
        return self.out(reduce(x, dim=0))


class Cache:
    """Decoding state: how many tokens the model has seen and each layer's attention state."""

    def __init__(self, n_layer: int):
        self.length = 0
        self.layers: list[dict] = [{} for _ in range(n_layer)]


class SpikeDecoder(nn.Module):
    def __init__(self, config: SpikeDecoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = SpikeEmbedding(config)
        blocks, spikes = [], self.embed.emits_spikes
        for i in range(config.n_layer):
            blocks.append(Block(config, i, input_spikes=spikes))
            spikes = config.residual >= 1
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(config, input_spikes=spikes)

    def forward(self, idx: Tensor, cache: Cache | None = None) -> Tensor:
        """Token ids (B, S) -> logits (B, S, V). With a cache, idx holds only the tokens after those seen."""
        start = cache.length if cache is not None else 0
        self.check_input(idx, start)
        x = self.embed(idx.long(), start)  # every integer dtype the check accepts (embedding takes int64)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.head(x)

    def check_input(self, idx: Tensor, start: int = 0) -> None:
        check_token_ids(idx, self.config.vocab_size, "input", self.config.max_len, start)

    # ------------------------------------------------------------------ inference helpers
    def new_cache(self) -> Cache:
        return Cache(self.config.n_layer)

    @torch.no_grad()
    def fold_norms(self) -> int:
        """Fold every eval-mode BatchNorm/PowerNorm into its Linear (inference only); returns how many."""
        if self.training:
            raise RuntimeError("fold_norms() uses running statistics: call model.eval() first")
        return sum(m.fold() for m in self.modules() if isinstance(m, LinearNorm))

    def to_events(self) -> nn.Module:
        """An event-driven, inference-only copy with the same answers (spikedecoder.events.to_events)."""
        from .events import to_events

        return to_events(self)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path, files: dict[str, str] | None = None) -> Path:
        """Write config.json + model.safetensors (+ extra text files) atomically into `directory`."""
        return save_model_files(directory, self.config.to_dict(), self.state_dict(), files or {})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> SpikeDecoder:
        config, state = load_model_files(directory, map_location)
        model = cls(SpikeDecoderConfig.from_dict(config))
        expected = model.state_dict()
        wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        if wrong:  # config.json and the weights disagree: name a few tensors, not all of them
            shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3])
            raise ValueError(
                f"checkpoint {directory} does not match its config: {len(wrong)} tensor(s) have a shape other than "
                f"config.json implies ({shown}{', ...' if len(wrong) > 3 else ''}); it was written by another "
                "version or is corrupt"
            )
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {directory} does not match its config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; it was written by another version or is corrupt"
            )
        return model.eval()

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, **sampling) -> Tensor:
        """Continue token ids (B, S) by max_new_tokens; see spikedecoder.generate.generate_ids for the options."""
        from .generate import generate_ids

        return generate_ids(self, idx, max_new_tokens, **sampling)
