"""Model configuration: one dataclass, validated at construction, with the ablation-ladder presets.

Every component has its own switch (embedding code, attention, MLP, head, residual, norm) so that the ANN and the
SNN differ only where the experiment says they should (SPEC section 5).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codes import code_bits, unique_sinusoid_width

TOKEN_CODES = ("onehot", "binary", "learned", "float")
POSITION_CODES = ("onehot", "binary", "sinusoidal", "learned")
COMBINES = ("concat", "sum")
ENCODINGS = ("direct", "rate")
ATTENTIONS = ("softmax", "spiking")
MLPS = ("gelu", "spiking")
HEADS = ("float", "spiking")
HEAD_COMBINES = ("mean", "sum", "concat", "last")
NORMS = ("layer", "batch", "power", "none")
SURROGATES = ("atan", "sigmoid")
THRESHOLDS = ("none", "layer", "channel")
LIF_BACKENDS = ("loop", "fused")
ATTN_NORMS = ("none", "coincidence")
FLOAT_STAGES = ("embedding", "attn_in", "qkv", "attn_out", "mlp_in", "mlp_hidden", "head")


class ConfigError(ValueError):
    """An invalid configuration: the message names the field and the fix."""


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value, whether given as a value or as a factory (a list)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def with_defaults(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Saved settings with the fields added to `cls` since they were written at their defaults: the behaviour the
    saved run had (an option that did not exist yet behaved as its default does now)."""
    return {f.name: field_default(f) for f in dataclasses.fields(cls)} | values


def reject_unknown(cls: type, values: dict[str, Any], what: str, valid: str = "valid") -> None:
    """A dataclass built from a dict (a file, --set): unknown keys are named with the valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; {valid}: {', '.join(sorted(known))}")


@dataclass
class SpikeDecoderConfig:
    """Everything that defines a model; saved as JSON next to the weights."""

    vocab_size: int = 65
    max_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    timesteps: int = 4
    # text-to-spike embedding (SPEC section 3)
    token_code: str = "learned"
    position_code: str = "learned"
    combine: str = "sum"
    code_dim: int | None = None  # width of a concatenated learned/float/sinusoidal code (default: see encoding)
    encoding: str = "direct"
    # components of the ablation ladder (SPEC section 5)
    attention: str = "spiking"
    mlp: str = "spiking"
    head: str = "spiking"
    head_lif: bool = True
    head_combine: str = "mean"
    residual: int = 0
    norm: str = "layer"
    attn_scale: float | str = 0.125
    first_attn_lif: bool = False
    attn_window: int | list[int] | None = None  # the last W tokens; or W per head (0 = all), repeated over the heads
    attn_norm: str = "none"  # "coincidence": divide each head's A V by its coincidence total q.z (a weighted mean)
    attn_key_conv: bool = False  # keys read the previous token too (a causal convolution of width 2 before K)
    token_conv: int = 1  # Q, K and V read the last K tokens' inputs (a causal convolution of width K; 1: own token)
    mlp_conv: int = 1  # the MLP's first Linear reads the last K tokens' inputs likewise
    # "full": the Linear reads the K tokens' inputs (K times its weights); "channel": it reads its own token and a
    # per-channel causal convolution of width K mixes its outputs over the last K tokens (H3's and Mamba's short
    # convolution: the weights and their accumulates once, plus K multiplies per output channel)
    conv_mode: str = "full"
    attn_key_init: str = "random"  # "previous": keys start as the previous token's query code (needs attn_key_conv)
    attn_power: int = 1  # 2: square the coincidence counts, (q.k)^2, a sharper lookup (decoding state d_h^2 x d_h);
    # under residual=2 the scores are binary, their own squares, so it changes nothing there
    attn_offset: bool = False  # a learned score offset per head: y = sum_j (q.k_j - b_h) v_j
    av_norm: bool = False  # normalise A V per token before the attention LIF (its magnitude grows with position)
    # LIF neuron (SPEC section 2)
    tau: float = 2.0
    v_threshold: float = 1.0
    decay_input: bool = True
    surrogate: str = "atan"
    surrogate_alpha: float | None = None
    learnable_threshold: str = "none"  # "channel": one per channel (the score map's LIF has none: one per layer)
    # learned membrane decay (PLIF): the leak 1/tau becomes a parameter sigmoid(w), w starting at -log(tau - 1), one
    # per LIF layer ("layer") or per channel ("channel"; the score map's LIF: one per layer). The energy measure
    # prices the leak as a multiply then (no shift), and the event engine runs it as tensor ops (not its kernel)
    learnable_tau: str = "none"
    # graded spikes where a Linear reads them (the inputs of the attention and the MLP, the MLP's hidden layer, the
    # attention output, the head): up to spike_levels spikes per step (thresholds v_th, 2 v_th, ...), and with
    # bipolar also negative ones; Q, K and V stay binary (their products count coincidences)
    spike_levels: int = 1
    bipolar: bool = False
    qkv_levels: int = 1  # graded Q, K, V: their products count the coincidences of the counts' binary planes
    # a diagnostic: stages computed in float (relu) instead of spikes, to find where spiking loses information;
    # any of FLOAT_STAGES ("embedding": the learned code is not binarised)
    float_stages: list[str] = dataclasses.field(default_factory=list)
    lif_backend: str = "loop"
    dropout: float = 0.0
    bias: bool = True
    preset: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        def choice(name: str, options: tuple) -> None:
            value = getattr(self, name)
            need(
                value in options,
                f"{name}={value!r} is not valid; choose one of {', '.join(map(str, options))}",
            )

        for name in ("vocab_size", "max_len", "n_layer", "n_head", "n_embd", "mlp_ratio", "token_conv", "mlp_conv"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        choice("conv_mode", ("full", "channel"))
        need(
            isinstance(self.timesteps, int) and self.timesteps >= 1,
            f"timesteps (T) must be an integer >= 1, got {self.timesteps!r}; use T=1 for the ANN",
        )
        need(
            self.n_embd % self.n_head == 0,
            f"n_head={self.n_head} must divide n_embd={self.n_embd}; pick e.g. n_head="
            f"{max(d for d in range(1, self.n_head + 1) if self.n_embd % d == 0)}",
        )
        choice("token_code", TOKEN_CODES)
        choice("position_code", POSITION_CODES)
        choice("combine", COMBINES)
        choice("encoding", ENCODINGS)
        choice("attention", ATTENTIONS)
        choice("mlp", MLPS)
        choice("head", HEADS)
        choice("head_combine", HEAD_COMBINES)
        choice("norm", NORMS)
        choice("surrogate", SURROGATES)
        choice("learnable_threshold", THRESHOLDS)
        choice("learnable_tau", THRESHOLDS)
        choice("lif_backend", LIF_BACKENDS)
        need(self.code_dim is None or self.code_dim >= 1, f"code_dim must be >= 1, got {self.code_dim}")
        need(
            self.residual in (0, 1, 2),
            f"residual={self.residual!r} must be 0 (float), 1 or 2 (spiking degree)",
        )
        need(
            self.combine == "concat" or (self.token_code in ("learned", "float") and self.position_code == "learned"),
            "combine='sum' adds two trained tables, so it needs token_code learned/float and position_code "
            f"learned; use combine='concat' for token_code={self.token_code!r}, position_code={self.position_code!r}",
        )
        window = self.attn_window
        windows = window if isinstance(window, (list, tuple)) else [window] if window is not None else []
        need(
            all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows)
            and (not isinstance(window, (list, tuple)) or (len(window) >= 1 and self.n_head % len(window) == 0))
            and (isinstance(window, (list, tuple)) or window != 0),
            f"attn_window must be None (whole context), an integer >= 1, or a list of integers, one per head "
            f"(0 = that head sees the whole context), whose length divides n_head={self.n_head} (it repeats over "
            f"the heads: [2, 0] with 4 heads is [2, 0, 2, 0]), got {window!r}",
        )
        choice("attn_norm", ATTN_NORMS)
        need(
            self.attn_key_init in ("random", "previous")
            and (
                self.attn_key_init == "random"
                or (self.attn_key_conv and self.token_conv == 1 and self.conv_mode == "full")
            ),
            f"attn_key_init must be 'random' or 'previous' (which needs attn_key_conv=true, token_conv=1 and "
            f"conv_mode='full': the key reads the previous token's inputs only through the key convolution), got "
            f"{self.attn_key_init!r} with attn_key_conv={self.attn_key_conv}, token_conv={self.token_conv}, "
            f"conv_mode={self.conv_mode!r}",
        )
        need(self.attn_power in (1, 2), f"attn_power must be 1 (counts q.k) or 2 (squared), got {self.attn_power!r}")
        if isinstance(window, tuple):
            self.attn_window = list(window)
        if isinstance(self.attn_scale, str):
            need(self.attn_scale == "auto", f"attn_scale must be a number or 'auto', got {self.attn_scale!r}")
        else:
            need(self.attn_scale > 0, f"attn_scale must be > 0, got {self.attn_scale}")
        need(self.tau > 1.0, f"tau must be > 1 (the membrane leaks by 1/tau), got {self.tau}")
        need(self.v_threshold > 0, f"v_threshold must be > 0, got {self.v_threshold}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(
            isinstance(self.spike_levels, int) and not isinstance(self.spike_levels, bool) and self.spike_levels >= 1,
            f"spike_levels must be an integer >= 1 (1: binary spikes), got {self.spike_levels!r}",
        )
        need(
            isinstance(self.float_stages, (list, tuple)) and set(self.float_stages) <= set(FLOAT_STAGES),
            f"float_stages must be a list of {', '.join(FLOAT_STAGES)}, got {self.float_stages!r}",
        )
        self.float_stages = list(self.float_stages)
        need(
            isinstance(self.qkv_levels, int) and not isinstance(self.qkv_levels, bool) and self.qkv_levels >= 1,
            f"qkv_levels must be an integer >= 1 (1: binary Q, K, V), got {self.qkv_levels!r}",
        )
        need(
            self.residual == 0 or (self.spike_levels == 1 and self.qkv_levels == 1 and not self.bipolar),
            f"spike_levels={self.spike_levels}, qkv_levels={self.qkv_levels}, bipolar={self.bipolar} need "
            "residual=0: a spiking residual stream (residual 1 or 2) carries binary spikes; set spike_levels=1, "
            "qkv_levels=1 and bipolar=false, or residual=0",
        )
        need(
            self.residual == 0 or (self.attention == "spiking" and self.mlp == "spiking"),
            "spiking residual (degree 1/2) needs attention='spiking' and mlp='spiking'",
        )
        self._reject_ignored_settings(need)

    def _reject_ignored_settings(self, need) -> None:
        """Settings that would be silently ignored (or do nothing) in this combination: say so instead."""
        if self.attention == "softmax":
            ignored = (("av_norm", False), ("first_attn_lif", False), ("attn_power", 1), ("attn_key_conv", False))
            for name, off in ignored:
                value = getattr(self, name)
                need(
                    value == off,
                    f"{name}={value!r} only applies to spiking attention, but attention='softmax' ignores it; "
                    f"remove {name} (or set it to {off!r}) or use attention='spiking'",
                )
        trained = ("learned", "float", "sinusoidal")
        need(
            self.code_dim is None
            or (self.combine == "concat" and {self.token_code, self.position_code} & set(trained)),
            f"code_dim={self.code_dim} is ignored: "
            + (
                "combine='sum' gives both codes the width n_embd; remove code_dim or use combine='concat'"
                if self.combine == "sum"
                else f"onehot/binary codes have a fixed width (token_code={self.token_code!r}, position_code="
                f"{self.position_code!r}); remove code_dim or use a learned/float/sinusoidal code"
            ),
        )
        if self.encoding == "rate" and self.spike_embedding:
            need(
                self._code_width() != self.n_embd,
                f"encoding='rate' does nothing here: token_code={self.token_code!r} already gives {{0,1}} spikes of "
                f"width n_embd={self.n_embd} straight to the first block, and a Bernoulli draw of 0 or 1 is "
                "deterministic; use encoding='direct', or token_code='float' (or combine='concat' with a code width "
                "other than n_embd, which adds a projection) for rate coding",
            )

    def _code_width(self) -> int:
        """Width of the embedding's code before any projection (as SpikeEmbedding builds it)."""
        if self.combine == "sum":
            return self.n_embd
        trained = self.code_dim or self.n_embd // 2

        def width(kind: str, n: int, sinusoid: int | None) -> int:
            if kind == "onehot":
                return n
            if kind == "binary":
                return code_bits(n)
            if kind == "sinusoidal":
                return sinusoid or unique_sinusoid_width(n)
            return trained

        return width(self.token_code, self.vocab_size, trained) + width(self.position_code, self.max_len, self.code_dim)

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def head_windows(self) -> list[int | None]:
        """The window of each attention head, None where it sees the whole context."""
        w = self.attn_window
        per_head = w * (self.n_head // len(w)) if isinstance(w, list) else [w] * self.n_head
        return [None if x in (None, 0) else x for x in per_head]

    @property
    def scale(self) -> float:
        """Attention scale: fixed (Spikformer's 0.125) or 1/(d_h * positions) to avoid saturating the LIF."""
        if self.attn_scale == "auto":
            return 1.0 / (self.head_dim * self.max_len)
        return float(self.attn_scale)

    @property
    def spike_embedding(self) -> bool:
        """The embedding emits {0,1} spikes unless the token code is float (partially spiking ladder)."""
        return self.token_code != "float"

    # ------------------------------------------------------------------ presets and I/O
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SpikeDecoderConfig:
        """The four rungs of the ablation ladder; overrides are applied on top and validated."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = {**PRESETS[name], "preset": name, **overrides}
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SpikeDecoderConfig:
        reject_unknown(cls, values, "config field(s)", "valid fields")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SpikeDecoderConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SpikeDecoderConfig:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path} is not valid JSON ({exc}); the checkpoint is corrupt, retrain or restore"
            ) from exc
        return cls.from_dict(values)


_ANN = dict(
    timesteps=1,
    token_code="float",
    position_code="learned",
    combine="sum",
    attention="softmax",
    mlp="gelu",
    head="float",
    head_lif=False,
    norm="layer",
)
PRESETS: dict[str, dict[str, Any]] = {
    "ann": _ANN,
    "spiking-attention": {**_ANN, "timesteps": 4, "attention": "spiking"},
    "spiking-attention-mlp": {**_ANN, "timesteps": 4, "attention": "spiking", "mlp": "spiking"},
    "spikedecoder": dict(
        # one timestep of graded spikes (up to 4 per neuron, Q, K and V too): better text and energy than binary
        # spikes at T = 4 (the frontier study), and in-context recall that forms under bf16 training as under fp32
        timesteps=1,
        spike_levels=4,
        qkv_levels=4,
        token_code="learned",
        position_code="learned",
        combine="sum",
        attention="spiking",
        mlp="spiking",
        head="spiking",
        head_lif=True,
        norm="layer",
        # window heads beside whole-context heads whose keys read the previous token, A V a weighted mean
        # (coincidence normaliser) of squared coincidences then LayerNorm; a lower threshold and a wider surrogate let
        # gradients through enough neurons for the lookup to form (benchmarks/recall.py, docs/attention.md)
        attn_window=[2, 0],  # repeated over the heads: [2, 0, 2, 0] with 4
        attn_norm="coincidence",
        attn_key_conv=True,
        av_norm=True,
        v_threshold=0.5,
        surrogate_alpha=1.0,
        attn_power=2,  # squared coincidence counts: a sharper lookup, recall robust across seeds (recall.py --seed)
    ),
}
