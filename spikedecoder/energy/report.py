"""`spikedecoder energy`: measure a checkpoint on its validation text (beside a baseline), print tables, plot."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .pricing import KINDS, PRESETS, WINDOW_BATCH, compare_reports, decode_report, energy_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run or checkpoint directory of the model to measure")
    base = p.add_mutually_exclusive_group()
    base.add_argument(
        "--baseline", metavar="ANN_CHECKPOINT", help="checkpoint of the ANN to compare with (default: no baseline)"
    )
    base.add_argument(
        "--baseline-preset",
        metavar="PRESET",
        help="compare with an untrained model of this preset (e.g. ann) and the checkpoint's sizes: "
        "op counts of a dense ANN do not depend on its weights (default: no baseline)",
    )
    p.add_argument("--preset", default="fp32", choices=sorted(PRESETS), help="energy per operation (default fp32)")
    p.add_argument("--memory", action="store_true", help="add one SRAM read per weight a token reads")
    p.add_argument(
        "--windows",
        type=int,
        default=4,
        help="validation windows to measure, >= 1, streamed: any number fits in memory (default 4)",
    )
    p.add_argument("--window", type=int, default=None, help="tokens per window, >= 1 (default: the model's max_len)")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm/PowerNorm unfolded")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="PNG",
                   help="write a bar chart (energy per sub-block) and firing rates into an existing folder "
                   "(default: no plot)")  # fmt: skip


def window_batches(ids: Tensor, length: int, count: int, batch: int = WINDOW_BATCH) -> Iterator[Tensor]:
    """`count` windows of `length` tokens spread evenly over the split (fewer tokens if the split is short), made
    `batch` at a time: only one batch of windows is ever held."""
    if count < 1 or length < 1:
        raise ValueError(f"need at least one window of at least one token, got {count} x {length}")
    length = min(length, len(ids))
    if length < 1:
        raise ValueError("the validation split is empty; train with val_frac > 0")
    starts = torch.linspace(0, len(ids) - length, count).round().long()
    for chunk in starts.split(batch):
        yield torch.stack([ids[s : s + length] for s in chunk.tolist()])


def validation_windows(ids: Tensor, length: int, count: int) -> Tensor:
    """All `count` windows of window_batches at once, (count, length)."""
    return torch.cat(list(window_batches(ids, length, count)))


def check_plot_path(path: str | Path) -> None:
    """Before any work: the plot's folder must exist and be writable, and matplotlib must know its format."""
    from ..rundir import check_writable

    folder = Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"--plot {path}: folder {folder} does not exist; create it or choose another path")
    check_writable(folder, "--plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from exc
    formats = Figure().canvas.get_supported_filetypes()
    if Path(path).suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--plot {path}: unknown image format; end the name with one of .{', .'.join(formats)}")


def _baseline_model(config, name: str) -> nn.Module:
    from ..config import SpikeDecoderConfig
    from ..model import SpikeDecoder

    sizes = {k: getattr(config, k) for k in ("vocab_size", "max_len", "n_layer", "n_head", "n_embd", "mlp_ratio")}
    torch.manual_seed(0)
    return SpikeDecoder(SpikeDecoderConfig.from_preset(name, **sizes)).eval()


def run(args: argparse.Namespace) -> int:
    from ..rundir import load_checkpoint, validation_ids

    if args.windows < 1:
        raise ValueError(f"--windows {args.windows}: give a number of windows >= 1")
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window {args.window}: give a number of tokens >= 1 (leave it out for the model's max_len)")
    if args.plot:
        check_plot_path(args.plot)
    model, tokenizer, meta = load_checkpoint(args.checkpoint)
    ids = validation_ids(meta, tokenizer)
    length = model.config.max_len if args.window is None else args.window
    if length > model.config.max_len:
        raise ValueError(f"--window {length} exceeds the model's max_len={model.config.max_len}")
    report = energy_report(model, window_batches(ids, length, args.windows), args.preset, args.memory, not args.no_fold)
    report["label"] = model.config.preset
    report["data"] = f"validation split: {report['batch']} windows x {report['window']} tokens"
    decode = report["window"] >= 2  # incremental decoding: a prefilled half window, then cached one-token steps
    if decode:
        windows = window_batches(ids, length, args.windows)
        report["decode"] = decode_report(model, windows, args.preset, args.memory, fold=not args.no_fold)
    result: dict[str, Any] = {"model": report}
    if args.baseline or args.baseline_preset:
        if args.baseline:
            base_model = load_checkpoint(args.baseline)[0]
        else:
            base_model = _baseline_model(model.config, args.baseline_preset)
        if base_model.config.vocab_size != model.config.vocab_size:
            raise ValueError("the baseline has another vocabulary; compare models trained with the same tokenizer")

        def base_windows() -> Iterator[Tensor]:
            return (b[:, : base_model.config.max_len] for b in window_batches(ids, length, args.windows))

        base = energy_report(base_model, base_windows(), args.preset, args.memory, fold=not args.no_fold)
        base["label"] = base_model.config.preset + ("" if args.baseline else " (untrained)")
        if decode and base["window"] >= 2:
            base["decode"] = decode_report(base_model, base_windows(), args.preset, args.memory, not args.no_fold)
        result["baseline"] = base
        result["comparison"] = compare_reports(report, base)
    if args.plot:
        plot_reports(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------------- output
_ORDER = [
    "embedding", "attention.qkv", "attention.scores", "attention.values", "attention.state", "attention.proj",
    "attention.norms", "attention.lif", "mlp.fc1", "mlp.act", "mlp.fc2", "mlp.norms", "mlp.lif", "residual",
    "head.norms", "head.lif", "head",
]  # fmt: skip


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def format_table(result: dict[str, Any]) -> str:
    """Terminal tables: pJ per token per sub-block (model beside baseline), ops per token, firing rates."""
    reports = [result["model"], *([result["baseline"]] if "baseline" in result else [])]
    first = reports[0]
    prices = first["prices_pj"]
    lines = [
        f"energy per token, {first['energy_preset']} (MAC {prices['mac']} pJ, AC {prices['ac']} pJ), "
        f"memory {'on' if first['memory'] else 'off'}; {first.get('data', '')}",
        "",
        f"{'sub-block':<18}" + "".join(f"{r.get('label', 'model'):>24}" for r in reports),
    ]
    names = _ordered({n for r in reports for n in r["per_subblock_pj"]})
    for n in names:
        lines.append(f"{n:<18}" + "".join(f"{r['per_subblock_pj'].get(n, 0.0):>21.1f} pJ" for r in reports))
    lines.append(f"{'total':<18}" + "".join(f"{r['total_pj_per_token']:>21.1f} pJ" for r in reports))
    lines.append(f"{'(nnz*fan-out)':<18}" + "".join(f"{r['total_pj_per_token_fanout']:>21.1f} pJ" for r in reports))
    if all("decode" in r for r in reports):
        d = first["decode"]
        lines.append(f"{'decoding step':<18}" + "".join(f"{r['decode']['pj_per_token']:>21.1f} pJ" for r in reports))
        lines.append(
            f"  (per-token energy of incremental decoding: each window's first {d['positions'][0]} tokens prefilled, "
            f"then one cached step per token at positions {d['positions'][0]}-{d['positions'][1]}, counted as run)"
        )
    if "comparison" in result:
        c = result["comparison"]
        lines += [
            "",
            f"saving: {c['saving_percent']:.1f} % (exact counts), {c['saving_percent_fanout']:.1f} % "
            f"(paper-style nnz*fan-out counts); {c['snn_pj_per_token']:.1f} vs {c['ann_pj_per_token']:.1f} pJ/token",
            f"matrix products only (the paper's scope): {c['saving_percent_synaptic']:.1f} % exact, "
            f"{c['saving_percent_synaptic_fanout']:.1f} % nnz*fan-out",
        ]
        if "saving_percent_every_step" in c and c["saving_percent_every_step"] != c["saving_percent"]:
            lines.append(
                f"work on an input identical at every timestep charged at every step instead of once: "
                f"{c['saving_percent_every_step']:.1f} % (matrix products only: "
                f"{c['saving_percent_synaptic_every_step']:.1f} %)"
            )
        if "decode_saving_percent" in c:
            lines.append(f"incremental decoding (one cached step per token): {c['decode_saving_percent']:.1f} %")
    lines += ["", f"{'ops per token':<18}" + "".join(f"{r.get('label', 'model'):>24}" for r in reports)]
    for kind in (*KINDS, "ac_fanout"):
        lines.append(f"{kind:<18}" + "".join(f"{r['ops_per_token'].get(kind, 0):>24,.0f}" for r in reports))
    for r in reports:
        if r["firing_rates"]:
            lines += ["", f"firing rates ({r.get('label', 'model')}, mean {r['mean_firing_rate']:.3f})"]
            lines += [f"  {name:<34}{rate:>8.3f}" for name, rate in r["firing_rates"].items()]
        if r["input_spike_density"]:
            lines += ["", f"spike density at each Linear's input, per step ({r.get('label', 'model')})"]
            lines += [f"  {name:<34}{d:>8.3f}" for name, d in r["input_spike_density"].items()]
    return "\n".join(lines)


def plot_reports(result: dict[str, Any], path: str | Path) -> None:
    """Left: pJ per token stacked per sub-block, model beside baseline. Right: firing rate per LIF layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [result["model"], *([result["baseline"]] if "baseline" in result else [])]
    names = _ordered({n for r in reports for n in r["per_subblock_pj"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.2]})
    colors = plt.get_cmap("tab20")
    labels = [r.get("label", "model") for r in reports]
    bottoms = [0.0] * len(reports)
    for i, n in enumerate(names):
        values = [r["per_subblock_pj"].get(n, 0.0) for r in reports]
        left.bar(labels, values, bottom=bottoms, label=n, color=colors(i % 20), width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for x, total in enumerate(bottoms):
        left.text(x, total, f"{total:,.0f} pJ", ha="center", va="bottom")
    title = f"energy per token ({reports[0]['energy_preset']})"
    if "comparison" in result:
        title += f": saving {result['comparison']['saving_percent']:.1f} %"
    left.set_title(title)
    left.set_ylabel("pJ per token")
    left.set_ylim(0, 1.08 * max(*bottoms, 1e-9))
    handles, texts = left.get_legend_handles_labels()  # top of the stack first
    left.legend(handles[::-1], texts[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    rates = reports[0]["firing_rates"]
    if rates:
        right.barh(list(rates), list(rates.values()), color="tab:orange")
        right.invert_yaxis()
        right.set_xlabel("firing rate (spikes per neuron per step)")
        right.tick_params(axis="y", labelsize=7)
    else:
        right.text(0.5, 0.5, "no LIF layers", ha="center", va="center")
    right.set_title(f"firing rate per LIF layer ({labels[0]}, validation text)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
