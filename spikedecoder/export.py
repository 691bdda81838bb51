"""Export a trained model to the standalone C runtime's binary file (runtime/sd.c reads it; runtime/README.md
documents the layout).

The file holds what the runtime needs and nothing it would have to work out: the config as integers, the character
vocabulary, then every weight in the order and layout the runtime reads it. Linears are stored transposed, (in, out),
so that an active input selects one contiguous row (the event Linear adds the rows of its active inputs; the ANN's
GEMV adds x_i times row i, the same loop with a multiply). BatchNorm/PowerNorm are folded into their Linear; a
threshold or learned decay is written per channel whatever its sharing. Under conv_mode "channel" a convolved Linear
reads one token and its taps, (K, out), follow it: the runtime mixes the folded Linear's outputs over the last K
tokens as layers.ChannelConv does. A model the runtime cannot run exactly is refused here with a ConfigError naming
the setting, never approximated.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from .config import ConfigError
from .model import SpikeDecoder
from .norms import LayerNorm, PowerNorm, SeqBatchNorm

MAGIC, END_MAGIC, VERSION = b"SDRT", b"SDND", 2
# the config integers in file order (runtime/sd.c reads them in this order)
INT_FIELDS = (
    "kind",  # 0 spiking, 1 ann
    "vocab_size",
    "max_len",
    "n_layer",
    "n_head",
    "n_embd",
    "hidden",
    "timesteps",
    "embed",  # 0 float tables summed (ann), 1 learned tables summed then binarised, 2 concatenated {0,1} codes
    "tok_width",  # width of the token code (concat), else n_embd
    "token_conv",  # tokens Q and V read (and the ANN's QKV)
    "key_width",  # tokens K reads (the key convolution: at least 2)
    "mlp_conv",
    "conv_mode",  # 0 full: a convolved Linear reads the K tokens' inputs; 1 channel: its outputs are convolved
    "spike_levels",
    "qkv_levels",
    "bipolar",
    "attn_power",
    "coincidence_norm",
    "norm",  # after each spiking Linear: 0 none (or folded into it), 1 LayerNorm
    "av_norm",  # 0 none, 1 per-channel affine (an eval BatchNorm/PowerNorm), 2 LayerNorm
    "head_combine",  # 0 mean, 1 sum, 2 concat, 3 last
    "learned_decay",  # every LIF has a learned leak (written per channel after its thresholds)
    "decay_input",
    "first_in_lif",  # block 0's attention has an input LIF (its input is not already spikes)
)
FLOAT_FIELDS = ("tau", "attn_scale", "ln_eps")
COMBINES = {"mean": 0, "sum": 1, "concat": 2, "last": 3}
PRESET_HINT = "export the `spikedecoder` or `ann` preset (with the options runtime/README.md lists)"


def _refuse(setting: str, fix: str) -> None:
    raise ConfigError(f"the C runtime cannot run {setting}; {fix}")


def check_exportable(model: SpikeDecoder, tokenizer: Any) -> str:
    """'spiking' or 'ann'; a ConfigError naming the first setting the runtime does not run, and what to do."""
    cfg = model.config
    if getattr(tokenizer, "kind", None) != "char":
        _refuse(f"a {getattr(tokenizer, 'kind', '?')!r} tokenizer", "train with tokenizer='char'")
    if len(tokenizer.chars) != cfg.vocab_size:
        _refuse(
            f"a vocabulary of {len(tokenizer.chars)} characters for vocab_size={cfg.vocab_size}",
            "export the checkpoint with the tokenizer it was trained with",
        )
    ann = (cfg.attention, cfg.mlp, cfg.head) == ("softmax", "gelu", "float")
    spiking = (cfg.attention, cfg.mlp, cfg.head) == ("spiking", "spiking", "spiking")
    if not (ann or spiking):
        _refuse(
            f"attention={cfg.attention!r}, mlp={cfg.mlp!r}, head={cfg.head!r} (a mixed rung of the ladder)",
            f"{PRESET_HINT}: every part spiking or every part ANN",
        )
    if cfg.float_stages:
        _refuse(f"float_stages={cfg.float_stages}", "remove float_stages (a training diagnostic)")
    if cfg.encoding != "direct":
        _refuse(f"encoding={cfg.encoding!r}", "use encoding='direct'")
    if cfg.attn_offset:
        _refuse("attn_offset=true", "set attn_offset=false")
    if ann:
        if cfg.timesteps != 1 or cfg.token_code != "float" or cfg.combine != "sum":
            _refuse(
                f"an ANN with timesteps={cfg.timesteps}, token_code={cfg.token_code!r}, combine={cfg.combine!r}",
                "use the `ann` preset's timesteps=1, token_code='float', combine='sum'",
            )
        return "ann"
    if cfg.residual != 0:
        _refuse(f"residual={cfg.residual}", "use residual=0 (the float residual stream)")
    if model.embed.in_proj is not None or not model.embed.emits_spikes:
        _refuse(
            f"an embedding projection (token_code={cfg.token_code!r}, position_code={cfg.position_code!r}, "
            f"combine={cfg.combine!r}: code width {model.embed.code_width} != n_embd {cfg.n_embd})",
            "use codes whose width is n_embd (learned codes, combine='sum' or 'concat' without code_dim)",
        )
    if cfg.first_attn_lif:
        _refuse("first_attn_lif=true", "set first_attn_lif=false")
    if not cfg.head_lif:
        _refuse("head_lif=false (a float head on a spiking model)", "set head_lif=true")
    if cfg.timesteps > 64:
        _refuse(f"timesteps={cfg.timesteps}", "use at most 64 timesteps")
    return "spiking"


# ---------------------------------------------------------------------------------------------- writing
class _Writer:
    def __init__(self, f: BinaryIO):
        self.f = f
        self.tensors = 0

    def raw(self, data: bytes) -> None:
        self.f.write(data)

    def u32(self, value: int) -> None:
        self.f.write(struct.pack("<I", value))

    def tensor(self, t: Tensor) -> None:
        """One array: its element count, then float32 values (little-endian, row-major)."""
        data = t.detach().to(torch.float32).contiguous().cpu()
        self.u32(data.numel())
        self.f.write(data.numpy().astype("<f4").tobytes())
        self.tensors += 1


def _rows(linear: nn.Linear) -> Tensor:
    """The weight transposed, (in, out): input i's row is contiguous."""
    return linear.weight.detach().t()


def _bias(linear: nn.Linear) -> Tensor:
    return linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)


def _per_channel(value: Tensor, channels: int) -> Tensor:
    return value.detach().to(torch.float32).reshape(-1).expand(channels) if value.numel() == 1 else value.detach()


def _lif(w: _Writer, lif: nn.Module, channels: int, learned: bool) -> None:
    w.tensor(_per_channel(lif.v_threshold, channels))
    if learned:
        w.tensor(_per_channel(lif.decay().to(torch.float32), channels))


def _linear_norm(w: _Writer, ln: nn.Module, layer_norm: bool) -> None:
    """A LinearNorm whose foldable norm was folded: rows, bias, then the LayerNorm's weight and bias if any."""
    w.tensor(_rows(ln.linear))
    w.tensor(_bias(ln.linear))
    if layer_norm:
        w.tensor(ln.norm.weight)
        w.tensor(ln.norm.bias)


def _taps(w: _Writer, conv: nn.Module | None) -> None:
    """A channel convolution's taps (K, out): row j weighs the output j tokens back. Nothing where there is none."""
    if conv is not None:
        w.tensor(conv.taps)


def _norm(w: _Writer, norm: nn.Module) -> int:
    """A standalone norm (av_norm): 0 none, 1 affine (a, c) of an eval BatchNorm/PowerNorm, 2 LayerNorm (w, b)."""
    if isinstance(norm, SeqBatchNorm | PowerNorm):
        a, c = norm.affine_map()
        w.tensor(a)
        w.tensor(c)
        return 1
    if isinstance(norm, LayerNorm):
        w.tensor(norm.weight)
        w.tensor(norm.bias)
        return 2
    return 0


def _ints(model: SpikeDecoder, kind: str) -> dict[str, int]:
    cfg = model.config
    av = model.blocks[0].attn.av_norm if kind == "spiking" else None
    return {
        "kind": 0 if kind == "spiking" else 1,
        "vocab_size": cfg.vocab_size,
        "max_len": cfg.max_len,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "hidden": cfg.mlp_ratio * cfg.n_embd,
        "timesteps": cfg.timesteps,
        "embed": 0 if kind == "ann" else 1 if cfg.combine == "sum" else 2,
        "tok_width": model.embed.token.width if cfg.combine == "concat" else cfg.n_embd,
        "token_conv": cfg.token_conv,
        "key_width": max(cfg.token_conv, 2 if cfg.attn_key_conv else 1),
        "mlp_conv": cfg.mlp_conv,
        "conv_mode": int(cfg.conv_mode == "channel"),
        "spike_levels": cfg.spike_levels,
        "qkv_levels": cfg.qkv_levels,
        "bipolar": int(cfg.bipolar),
        "attn_power": cfg.attn_power,
        "coincidence_norm": int(cfg.attn_norm == "coincidence"),
        "norm": int(cfg.norm == "layer"),
        "av_norm": 0 if av is None else 1 if isinstance(av, SeqBatchNorm | PowerNorm) else 2,
        "head_combine": COMBINES[cfg.head_combine],
        "learned_decay": int(cfg.learnable_tau != "none"),
        "decay_input": int(cfg.decay_input),
        "first_in_lif": int(kind == "spiking" and model.blocks[0].attn.in_lif is not None),
    }


def _embedding(w: _Writer, model: SpikeDecoder, kind: str) -> None:
    embed = model.embed
    if kind == "ann" or model.config.combine == "sum":  # float tables (binarised after the sum when spiking)
        w.tensor(embed.token.table.weight)
        w.tensor(embed.position.table.weight)
        return
    for code, n in ((embed.token, model.config.vocab_size), (embed.position, model.config.max_len)):
        ids = torch.arange(n)
        bits = code(ids)
        w.tensor(code.binarise(bits) if code.binarise is not None else bits)  # {0, 1}: the concatenated halves


def _spiking_weights(w: _Writer, model: SpikeDecoder) -> None:
    cfg = model.config
    e, layer_norm, learned = cfg.n_embd, cfg.norm == "layer", cfg.learnable_tau != "none"
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if attn.in_lif is not None:
            _lif(w, attn.in_lif, e, learned)
        for proj, conv in ((attn.q, attn.q_conv), (attn.k, attn.k_conv), (attn.v, attn.v_conv)):
            _linear_norm(w, proj, layer_norm)
            _taps(w, conv)
        for lif in (attn.q_lif, attn.k_lif, attn.v_lif):
            _lif(w, lif, e, learned)
        if attn.av_norm is not None:
            _norm(w, attn.av_norm)
        _lif(w, attn.attn_lif, e, learned)
        _linear_norm(w, attn.proj, layer_norm)
        _lif(w, mlp.in_lif, e, learned)
        _linear_norm(w, mlp.fc1, layer_norm)
        _taps(w, mlp.fc1_conv)
        _lif(w, mlp.hidden_lif, cfg.mlp_ratio * e, learned)
        _linear_norm(w, mlp.fc2, layer_norm)
    _lif(w, model.head.lif, e, learned)
    w.tensor(_rows(model.head.out))
    w.tensor(_bias(model.head.out))


def _ann_weights(w: _Writer, model: SpikeDecoder) -> None:
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        for t in (attn.ln.weight, attn.ln.bias, _rows(attn.qkv), _bias(attn.qkv)):
            w.tensor(t)
        _taps(w, attn.qkv_conv)
        for t in (_rows(attn.proj), _bias(attn.proj), mlp.ln.weight, mlp.ln.bias, _rows(mlp.fc1), _bias(mlp.fc1)):
            w.tensor(t)
        _taps(w, mlp.fc1_conv)
        for t in (_rows(mlp.fc2), _bias(mlp.fc2)):
            w.tensor(t)
    head = model.head
    for t in (head.ln.weight, head.ln.bias, _rows(head.out), _bias(head.out)):
        w.tensor(t)


@torch.no_grad()
def export_model(model: SpikeDecoder, tokenizer: Any, out: str | Path) -> dict[str, Any]:
    """Write `model` (norms folded, on a copy) and its char vocabulary to `out`; returns a summary (kind, bytes,
    tensors). Refuses (ConfigError) what the runtime cannot run, before writing anything."""
    kind = check_exportable(model, tokenizer)
    model = copy.deepcopy(model).eval()
    model.fold_norms()
    ints, cfg = _ints(model, kind), model.config
    floats = {"tau": cfg.tau, "attn_scale": cfg.scale, "ln_eps": 1e-5}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        w = _Writer(f)
        w.raw(MAGIC)
        w.u32(VERSION)
        w.u32(len(INT_FIELDS))
        w.raw(struct.pack(f"<{len(INT_FIELDS)}i", *(ints[k] for k in INT_FIELDS)))
        w.u32(len(FLOAT_FIELDS))
        w.raw(struct.pack(f"<{len(FLOAT_FIELDS)}f", *(floats[k] for k in FLOAT_FIELDS)))
        w.raw(struct.pack(f"<{cfg.n_head}i", *(h or 0 for h in cfg.head_windows)))
        w.u32(len(tokenizer.chars))
        for c in tokenizer.chars:
            data = c.encode("utf-8")
            w.raw(struct.pack("<B", len(data)) + data)
        _embedding(w, model, kind)
        (_spiking_weights if kind == "spiking" else _ann_weights)(w, model)
        w.raw(END_MAGIC)
    tmp.replace(out)
    return {"kind": kind, "bytes": out.stat().st_size, "tensors": w.tensors}
