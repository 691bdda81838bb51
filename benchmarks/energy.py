"""Energy per token of trained models against an ANN baseline, under every energy preset: the table of docs/energy.md.

    python benchmarks/energy.py runs/make-run/spikedecoder [more checkpoints] --baseline runs/make-run/ann
        [--windows 4] [--plot energy.png]

Each model is measured on the same validation windows (its max_len tokens each) as its baseline; the savings are
given with exact counts and with the paper-style nnz * fan-out counts, per 45 nm preset, with and without the
memory term. The plot (optional) is the CLI's chart for the first model.
"""

from __future__ import annotations

import argparse

from spikedecoder.energy import PRESETS, compare_reports, energy_report, plot_reports, validation_windows
from spikedecoder.rundir import load_checkpoint, read_history, validation_ids


def measure(path: str, baseline: str, windows: int) -> list[str]:
    model, tokenizer, meta = load_checkpoint(path)
    base = load_checkpoint(baseline)[0]
    idx = validation_windows(validation_ids(meta, tokenizer), model.config.max_len, windows)
    base_idx = idx[:, : base.config.max_len]
    history = read_history(path)
    quality = history[-1].get("bits_per_char", history[-1].get("perplexity")) if history else float("nan")
    cells, first = [], None
    for preset, memory in [(p, False) for p in PRESETS] + [("fp32", True)]:
        snn = energy_report(model, idx, preset, memory)
        c = compare_reports(snn, energy_report(base, base_idx, preset, memory))
        first = first or (snn, c)
        cells.append(f"{c['snn_pj_per_token']:,.0f} / {c['ann_pj_per_token']:,.0f} ({c['saving_percent']:.1f} %)")
        if first[1] is c:
            cells += [f"{c['saving_percent_fanout']:.1f} %", f"{c['saving_percent_synaptic_fanout']:.1f} %"]
    snn = first[0]
    name = f"{model.config.preset} ({model.config.norm} norm, T={model.config.timesteps})"
    return [name, f"{quality:.3f}", f"{snn['mean_firing_rate']:.3f}", *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="spiking (or partially spiking) model checkpoints")
    parser.add_argument("--baseline", required=True, help="the ANN checkpoint")
    parser.add_argument("--windows", type=int, default=4, help="validation windows per model (default 4)")
    parser.add_argument("--plot", help="chart of the first model against the baseline (PNG)")
    args = parser.parse_args()
    header = ["model", "val bpc", "mean firing rate", "fp32 pJ/token SNN / ANN (saving)", "fp32, nnz*fan-out",
              "fp32, matrix products only (paper's scope)", "fp16", "int8", "fp32 + weight reads"]  # fmt: skip
    rows = [measure(path, args.baseline, args.windows) for path in args.checkpoints]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.plot:
        model, tokenizer, meta = load_checkpoint(args.checkpoints[0])
        base = load_checkpoint(args.baseline)[0]
        idx = validation_windows(validation_ids(meta, tokenizer), model.config.max_len, args.windows)
        snn, ann = energy_report(model, idx), energy_report(base, idx[:, : base.config.max_len])
        snn["label"], ann["label"] = model.config.preset, base.config.preset
        plot_reports({"model": snn, "baseline": ann, "comparison": compare_reports(snn, ann)}, args.plot)
        print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    main()
