"""The study's aggregate files: one row per variant with savings against the baseline (results.csv, results.md),
the quality-vs-energy frontier, the training curves and the firing rates (frontier.png, curves.png,
firing_rates.png). Reads only the variants' result.json and log.csv; study.py runs the grid."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

PLOTS = ("frontier.png", "gap_vs_saving.png", "curves.png", "firing_rates.png")


def metric_name(results: list[dict]) -> str:
    return "bits_per_char" if all("bits_per_char" in r["val"] for r in results) else "perplexity"


def summarise(results: list[dict], baseline: str) -> list[dict[str, Any]]:
    """One flat row per variant, with savings and quality gap against the baseline (when it has been measured)."""
    from .energy import compare_reports

    metric = metric_name(results)
    base = next((r for r in results if r["name"] == baseline), None)
    rows = []
    for r in results:
        e, cfg = r["energy"], r["fingerprint"]["model"]
        row = {
            "name": r["name"],
            "group": r["group"],
            "preset": r["preset"],
            "finished": r["step"] >= r["max_steps"],
            "step": r["step"],
            "max_steps": r["max_steps"],
            "params": r["params"],
            "timesteps": cfg["timesteps"],
            "token_code": cfg["token_code"],
            "position_code": cfg["position_code"],
            "residual": cfg["residual"],
            "norm": cfg["norm"],
            "val_loss": r["val"]["loss"],
            f"val_{metric}": r["val"][metric],
            "val_accuracy": r["val"]["accuracy"],
            "pj_per_token": e["total_pj_per_token"],
            "pj_per_token_fanout": e["total_pj_per_token_fanout"],
            "saving_percent": None,
            "saving_percent_fanout": None,
            "saving_percent_synaptic": None,
            "saving_percent_every_step": None,
            "saving_percent_synaptic_every_step": None,
            f"{metric}_gap": None,
            "mean_firing_rate": e["mean_firing_rate"],
            "train_seconds": r["train_seconds"],
        }
        if base is not None:
            comparison = compare_reports(e, base["energy"])
            row["saving_percent"] = comparison["saving_percent"]
            row["saving_percent_fanout"] = comparison["saving_percent_fanout"]
            row["saving_percent_synaptic"] = comparison["saving_percent_synaptic"]
            for key in ("saving_percent_every_step", "saving_percent_synaptic_every_step"):  # absent: older results
                row[key] = comparison.get(key)
            row[f"{metric}_gap"] = r["val"][metric] - base["val"][metric]
        for place, pj in sorted(e["per_subblock_pj"].items()):
            row[f"pj_{place}"] = pj
        rows.append(row)
    return rows


def pareto(rows: list[dict], metric: str) -> list[dict]:
    """Variants no other one beats on both energy and quality (lower is better for both), by energy."""
    front, best = [], math.inf
    for row in sorted(rows, key=lambda r: (r["pj_per_token"], r[f"val_{metric}"])):
        if row[f"val_{metric}"] < best:
            front.append(row)
            best = row[f"val_{metric}"]
    return front


def write_csv(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _fmt(value: Any, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def markdown(rows: list[dict], settings: dict[str, Any], baseline: str, command: str, missing: list[str]) -> str:
    """The results table and the headline findings, as Markdown."""
    metric = "bits_per_char" if "val_bits_per_char" in rows[0] else "perplexity"
    label = "bits/char" if metric == "bits_per_char" else "perplexity"
    base = next((r for r in rows if r["name"] == baseline), None)
    lines = [
        "# Study results",
        "",
        f"Command: `{command}`",
        "",
        f"Energy: {settings['energy_preset']} 45 nm prices, memory {'on' if settings['energy_memory'] else 'off'}, "
        f"counted on {settings['energy_windows']} validation windows of max_len tokens. Quality: the whole "
        "validation split"
        + ("" if settings["final_eval_batches"] is None else f" (first {settings['final_eval_batches']} batches)")
        + ". "
        f"Savings and gaps are against `{baseline}`: all arithmetic (the total), matrix products only (the paper's "
        "scope), and both with work on an input identical at every timestep charged at every step instead of once.",
        "",
        f"| variant | group | params | T | val {label} | gap vs ANN | accuracy | pJ/token | saving vs ANN "
        "| matrix products only | every step | matrix products, every step | firing rate | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"**{r['name']}**" if r["name"] == baseline else r["name"]
        if not r["finished"]:
            name += f" (partial: {r['step']}/{r['max_steps']} steps)"
        lines.append(
            f"| {name} | {r['group']} | {r['params']:,} | {r['timesteps']} | {r[f'val_{metric}']:.3f} | "
            f"{_fmt(r[f'{metric}_gap'], '+.3f')} | {r['val_accuracy']:.3f} | {r['pj_per_token']:,.0f} | "
            + " | ".join(
                _fmt(r[k], ".1f") + ("" if r[k] is None else " %")
                for k in (
                    "saving_percent",
                    "saving_percent_synaptic",
                    "saving_percent_every_step",
                    "saving_percent_synaptic_every_step",
                )
            )
            + f" | {_fmt(r['mean_firing_rate'], '.3f')} | {r['train_seconds']:.0f} s |"
        )
    if missing:
        lines += ["", f"Not yet measured: {', '.join(missing)} (rerun the command to continue)."]
    lines += ["", "## Findings", ""]
    front = pareto(rows, metric)
    lines.append("Pareto frontier (lowest energy first): " + ", ".join(f"`{r['name']}`" for r in front) + ".")
    if base is not None:
        spiking = [r for r in rows if r["name"] != baseline and r["mean_firing_rate"] is not None]
        saving85 = [r for r in spiking if r["saving_percent"] is not None and r["saving_percent"] >= 85.0]
        if saving85:
            best = min(saving85, key=lambda r: r[f"val_{metric}"])
            lines.append(
                f"{len(saving85)} of {len(spiking)} spiking variants save at least 85 % energy per token; the best "
                f"of them, `{best['name']}`, saves {best['saving_percent']:.1f} % "
                f"({best['pj_per_token']:,.0f} vs {base['pj_per_token']:,.0f} pJ/token) at {label} "
                f"{best[f'val_{metric}']:.3f} vs the ANN's {base[f'val_{metric}']:.3f} "
                f"(gap {best[f'{metric}_gap']:+.3f})."
            )
        else:
            lines.append("No spiking variant saves 85 % energy per token or more in this study.")
        if spiking:
            best = min(spiking, key=lambda r: r[f"val_{metric}"])
            lines.append(
                f"The best spiking variant by {label} is `{best['name']}`: {best[f'val_{metric}']:.3f} "
                f"(gap {best[f'{metric}_gap']:+.3f}), saving {best['saving_percent']:.1f} %."
            )
    lines += ["", "![frontier](frontier.png)", "", "![gap vs saving](gap_vs_saving.png)", "",
              "![training curves](curves.png)", "",
              "![firing rates](firing_rates.png)", ""]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _read_train_loss(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    path = run_dir / "log.csv"
    if path.exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row["key"] == "train/loss":
                    steps.append(int(row["step"]))
                    losses.append(float(row["value"]))
    return steps, losses


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so that the first steps are not pulled towards zero."""
    out, avg = [], 0.0
    for n, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**n))
    return out


_LIF_STAGES = ("attn.in_lif", "attn.q_lif", "attn.k_lif", "attn.v_lif", "attn.score_lif", "attn.attn_lif",
               "attn_sum_lif", "mlp.in_lif", "mlp.hidden_lif", "mlp_sum_lif")  # fmt: skip


def _lif_order(name: str) -> tuple:
    """Embedding first, then block by block in the order a token flows through it, the head last."""
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m:
        stage = m.group(2)
        return (1, int(m.group(1)), _LIF_STAGES.index(stage) if stage in _LIF_STAGES else len(_LIF_STAGES))
    return (0 if name.startswith("embed") else 2, 0, 0)


def plot_all(rows: list[dict], results: list[dict], runs: Path, out: Path, baseline: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_name(results)
    label = "val bits/char" if metric == "bits_per_char" else "val perplexity"
    groups = list(dict.fromkeys(r["group"] for r in rows))
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}

    # 1. quality vs energy, Pareto frontier, ANN marked
    fig, ax = plt.subplots(figsize=(9, 6))
    for g in groups:
        pts = [r for r in rows if r["group"] == g and r["name"] != baseline]
        ax.scatter([r["pj_per_token"] for r in pts], [r[f"val_{metric}"] for r in pts], color=colors[g], label=g,
                   s=40, zorder=3)  # fmt: skip
    for i, r in enumerate(sorted(rows, key=lambda r: r["pj_per_token"])):  # alternate sides: neighbours overlap
        ax.annotate(r["name"], (r["pj_per_token"], r[f"val_{metric}"]), fontsize=7, xytext=(4, 4 if i % 2 else -10),
                    textcoords="offset points")  # fmt: skip
    front = pareto(rows, metric)
    ax.step([r["pj_per_token"] for r in front], [r[f"val_{metric}"] for r in front], where="post", color="0.4",
            lw=1, ls="--", label="Pareto frontier", zorder=2)  # fmt: skip
    base = next((r for r in rows if r["name"] == baseline), None)
    if base is not None:
        ax.scatter([base["pj_per_token"]], [base[f"val_{metric}"]], marker="*", s=250, color="black",
                   label=f"ANN ({baseline})", zorder=4)  # fmt: skip
        ax.axvline(0.15 * base["pj_per_token"], color="tab:green", lw=1, ls=":", label="85 % saving vs ANN")
    ax.set_xscale("log")
    ax.set_xlabel("energy per token (pJ, log scale)")
    ax.set_ylabel(label)
    ax.set_title("quality vs energy per token (lower left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)

    # 1b. the quality gap to the ANN (%) against the saving (%): both accountings, the target corner marked
    fig, ax = plt.subplots(figsize=(9, 6))
    measured = [r for r in rows if r["saving_percent"] is not None and r["name"] != baseline]
    for g in groups:
        pts = [r for r in measured if r["group"] == g]
        gaps = [100 * r[f"{metric}_gap"] / base[f"val_{metric}"] for r in pts] if base else []
        ax.scatter([r["saving_percent"] for r in pts], gaps, color=colors[g], label=f"{g}: all arithmetic", s=40)
        ax.scatter([r["saving_percent_synaptic"] for r in pts], gaps, color=colors[g], marker="x", s=30,
                   label=f"{g}: matrix products only")  # fmt: skip
        for r, gap in zip(pts, gaps, strict=True):
            ax.annotate(r["name"], (r["saving_percent"], gap), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axvline(90, color="tab:green", lw=1, ls=":", label="90 % saving")
    ax.axhline(5, color="tab:red", lw=1, ls=":", label="5 % gap")
    ax.set_xlabel("energy saving per token vs the ANN (%)")
    ax.set_ylabel(f"{label} gap to the ANN (%)")
    ax.set_title("quality gap against energy saving (lower right is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_saving.png", dpi=120)
    plt.close(fig)

    # 2. training curves: smoothed training loss and validation metric
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(results):
        color = "black" if r["name"] == baseline else cmap(i % 20)
        steps, losses = _read_train_loss(runs / r["name"])
        if steps:
            left.plot(steps, _smooth(losses), color=color, lw=1, label=r["name"])
        hist = [h for h in r["history"] if metric in h]
        if hist:
            right.plot([h["step"] for h in hist], [h[metric] for h in hist], marker="o", ms=3, color=color, lw=1,
                       label=r["name"])  # fmt: skip
    left.set_xlabel("step")
    left.set_ylabel("training loss (nats, smoothed)")
    right.set_xlabel("step")
    right.set_ylabel(label + " (periodic evaluations)")
    for a in (left, right):
        a.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    # 3. firing rate per LIF layer (rows: spiking variants)
    spiking = [r for r in results if r["energy"]["firing_rates"]]
    fig_h = 1.5 + 0.45 * max(1, len(spiking))
    if spiking:
        names = list(dict.fromkeys(n for r in spiking for n in r["energy"]["firing_rates"]))
        names.sort(key=_lif_order)  # stable: keeps the module order within a block
        grid = [[r["energy"]["firing_rates"].get(n, math.nan) for n in names] for r in spiking]
        fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(names) + 3), fig_h + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.3, max(max(
            (v for v in row if not math.isnan(v)), default=0) for row in grid)))  # fmt: skip
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 * im.norm.vmax else "black")  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(spiking)), [r["name"] for r in spiking], fontsize=8)
        fig.colorbar(im, ax=ax, label="firing rate")
        ax.set_title("firing rate per LIF layer on validation text (blank: layer absent)")
    else:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no spiking variants measured yet", ha="center", va="center")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "firing_rates.png", dpi=120)
    plt.close(fig)
    return list(PLOTS)


def aggregate(results: list[dict], out: Path, settings: dict, command: str, missing: list[str]) -> list[dict]:
    """Write results.csv, results.md and the plots from the measured variants (in the study's order)."""
    if not results:
        return []
    rows = summarise(results, settings["baseline"])
    write_csv(rows, out / "results.csv")
    plot_all(rows, results, out / "runs", out, settings["baseline"])
    (out / "results.md").write_text(markdown(rows, settings, settings["baseline"], command, missing) + "\n")
    return rows
