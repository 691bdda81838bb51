"""Write the measured tables of the README and docs/ from results files, so every figure there comes from a named
command.

    python benchmarks/readme_figures.py --run runs/make-run [--recall docs/recall.json] [--decode docs/decode.json]
        [--study frontier=runs/study-frontier ...] [--files README.md docs/*.md] [--check]

Each table sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->` and is replaced whole in every file that
holds those markers (README.md and docs/*.md unless --files names others):
- make-run: `runs/make-run/results.json` (written by `make run`) -> params, steps, train seconds, val bits/char;
- energy: `spikedecoder energy RUN/spikedecoder --baseline RUN/ann` recomputed here (4 validation windows, fp32),
  the per-sub-block table and the savings;
- energy-presets: the same windows under every 45 nm preset and with weight reads (`--memory`), one table row,
  and the sentences that quote it (the saving with weight reads, incremental decoding's saving), so that the
  prose cannot disagree with its table;
- recall: the JSON of `python benchmarks/recall.py --json` (one row per variant);
- decode: the JSON of `python benchmarks/decode.py --json` (one row per width and engine);
- NAME for each `--study NAME=DIR`: the table of a finished `spikedecoder study ... --out DIR` (DIR/results.md, one
  row per variant, with the study's command), and its frontier and gap-vs-saving plots, copied to
  docs/NAME_frontier.png and docs/NAME_gap_vs_saving.png.
A block whose source is not given is left as it is; a block whose source is given but that no file holds is an
error. `--check` changes nothing and exits 1 if a block would change in any file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from spikedecoder.energy import PRESETS, compare_reports, decode_report, energy_report, validation_windows
from spikedecoder.rundir import load_checkpoint, validation_ids


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    rule = align or "|" + "---|" * len(header)
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)])


def make_run_block(run: Path, reports: tuple[dict, dict, int]) -> str:
    results = json.loads((run / "results.json").read_text())
    rows = []
    for name, r in results.items():
        val = r["val"]
        rows.append(
            [name, f"{r['params']:,}", f"{r['step']:,}", f"{r['train_seconds']:.0f}"]
            + [f"**{val['bits_per_char']:.3f}**", f"{val['accuracy']:.3f}"]
        )
    header = ["model", "params", "steps", "train s", "val bits/char", "val accuracy"]
    c = compare_reports(*reports[:2])
    bpc = {name: r["val"]["bits_per_char"] for name, r in results.items()}
    return table(header, rows, "|---|---:|---:|---:|---:|---:|") + (
        f"\n\nFrom `{run}/results.json`. The spiking model is {100 * (bpc['spikedecoder'] / bpc['ann'] - 1):.1f} % "
        f"behind its twin in bits/char and spends **{c['saving_percent']:.1f} % less energy per token** "
        f"({c['snn_pj_per_token']:,.0f} against {c['ann_pj_per_token']:,.0f} pJ: full forward, all arithmetic, 45 nm "
        f"fp32 prices; `spikedecoder energy {run}/spikedecoder --baseline {run}/ann`)."
    )


def measured_energy(run: Path, windows: int = 4) -> tuple[dict, dict, int]:
    """The energy reports of make run's two checkpoints on the same validation windows (fp32), and the window
    length: measured once, quoted by the make-run and energy blocks."""
    model, tokenizer, meta = load_checkpoint(run / "spikedecoder")
    base = load_checkpoint(run / "ann")[0]
    idx = validation_windows(validation_ids(meta, tokenizer), model.config.max_len, windows)
    return energy_report(model, idx), energy_report(base, idx[:, : base.config.max_len]), model.config.max_len


def energy_block(run: Path, reports: tuple[dict, dict, int], windows: int = 4) -> str:
    snn, ann, max_len = reports
    c = compare_reports(snn, ann)
    rows = [[place, f"{v['snn']:,.0f}", f"{v['ann']:,.0f}"] for place, v in sorted(c["per_subblock_pj"].items())]
    rows.append(["**total**", f"**{c['snn_pj_per_token']:,.0f}**", f"**{c['ann_pj_per_token']:,.0f}**"])
    lines = [
        table(["sub-block (pJ per token, fp32, both blocks)", "spikedecoder", "ann"], rows, "|---|---:|---:|"),
        "",
        f"Saving **{c['saving_percent']:.1f} %** with exact counts ({c['saving_percent_fanout']:.1f} % with the "
        f"paper's nnz × fan-out counts); matrix products only (the paper's scope): "
        f"{c['saving_percent_synaptic']:.1f} % exact, {c['saving_percent_synaptic_fanout']:.1f} % nnz × fan-out. "
        f"Mean firing rate {snn['mean_firing_rate']:.3f}. Measured on {windows} validation windows of "
        f"{max_len} tokens by `spikedecoder energy {run}/spikedecoder --baseline {run}/ann`.",
    ]
    return "\n".join(lines)


def presets_block(run: Path, windows: int = 4) -> str:
    """fp32, nnz x fan-out, the paper's scope, fp16, int8 and fp32 with weight reads, and decoding, in one row and
    the sentences quoting it, all from one set of measurements."""
    model, tokenizer, meta = load_checkpoint(run / "spikedecoder")
    base = load_checkpoint(run / "ann")[0]
    idx = validation_windows(validation_ids(meta, tokenizer), model.config.max_len, windows)
    base_idx = idx[:, : base.config.max_len]
    compared = {}
    for preset, memory in [(p, False) for p in PRESETS] + [("fp32", True)]:
        snn = energy_report(model, idx, preset, memory)
        compared[preset, memory] = snn, compare_reports(snn, energy_report(base, base_idx, preset, memory))
    snn, fp32 = compared["fp32", False]
    mem = compared["fp32", True][1]

    def cell(c: dict) -> str:
        return f"{c['snn_pj_per_token']:,.0f} / {c['ann_pj_per_token']:,.0f} ({c['saving_percent']:.1f} %)"

    cfg = model.config
    bpc = json.loads((run / "results.json").read_text())["spikedecoder"]["val"]["bits_per_char"]
    row = [
        f"spikedecoder ({cfg.norm} norm, T = {cfg.timesteps}, attention window {cfg.attn_window or 'none'}"
        + (", key convolution)" if cfg.attn_key_conv else ")"),
        f"{bpc:.3f}",
        f"{snn['mean_firing_rate']:.3f}",
        f"{fp32['snn_pj_per_token']:,.0f} / {fp32['ann_pj_per_token']:,.0f} (**{fp32['saving_percent']:.1f} %**)",
        f"{fp32['saving_percent_fanout']:.1f} %",
        f"{fp32['saving_percent_synaptic_fanout']:.1f} %",
        cell(compared["fp16", False][1]),
        cell(compared["int8", False][1]),
        cell(mem),
    ]
    header = ["model", "val bpc", "mean firing rate", "fp32 pJ/token SNN / ANN (saving)", "fp32, nnz × fan-out",
              "matrix products only (paper's scope, nnz × fan-out)", "fp16", "int8", "fp32 + weight reads"]  # fmt: skip
    snn_decode, ann_decode = decode_report(model, idx), decode_report(base, base_idx)
    decode_saving = 100 * (1 - snn_decode["pj_per_token"] / ann_decode["pj_per_token"])
    return "\n".join([
        table(header, [row]),
        "",
        f"With weight reads counted (`--memory`: one SRAM read per weight a token reads) the saving is "
        f"**{mem['saving_percent']:.1f} %** ({mem['snn_pj_per_token']:,.0f} vs {mem['ann_pj_per_token']:,.0f} pJ per "
        f"token, the last column): the SNN reads the weight row of every input that spikes at any of its T steps, "
        f"once per token. Incremental decoding (one cached step per token, the `decoding step` line of "
        f"`spikedecoder energy`) costs {snn_decode['pj_per_token']:,.0f} vs {ann_decode['pj_per_token']:,.0f} pJ per "
        f"token, a **{decode_saving:.1f} %** saving. Measured on {windows} validation windows of {cfg.max_len} tokens "
        f"by `python benchmarks/readme_figures.py --run {run}`.",
    ])  # fmt: skip


def recall_block(path: Path) -> str:
    results = json.loads(path.read_text())["results"]
    columns = [("mqar", 4), ("mqar", 8), ("mqar", 16), ("copy", None)]
    by_variant: dict[str, dict] = {}
    for r in results:
        by_variant.setdefault(r["variant"], {})[(r["task"], r["pairs"])] = r["accuracy"]
    rows = [[v, *(f"{acc[c]:.3f}" if c in acc else "-" for c in columns)] for v, acc in by_variant.items()]
    header = ["variant", "MQAR 4 pairs", "MQAR 8 pairs", "MQAR 16 pairs", "copy"]
    source = f"\n\nFrom `{path}` (`python benchmarks/recall.py --json > {path}`)."
    return table(header, rows, "|---|---:|---:|---:|---:|") + source


def decode_block(path: Path) -> str:
    rows = json.loads(path.read_text())["rows"]
    out = [
        [str(r["width"]), r["engine"], f"{r['ms_per_token']:.2f}", f"{r['tokens_per_s']:.0f}"]
        + [f"{r['weight_bytes_per_token'] / 2**20:.2f}"]
        for r in rows
    ]
    header = ["width", "engine", "ms / token", "tokens / s", "weight MiB read / token"]
    source = f"\n\nFrom `{path}` (`python benchmarks/decode.py --json > {path}`)."
    return table(header, out, "|---:|---|---:|---:|---:|") + source


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- figures:{name} -->\n)(?:.*?\n)?(<!-- /figures:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- figures:{name} --> ... <!-- /figures:{name} --> block; add one")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def default_files() -> list[Path]:
    """README.md and every page of docs/, as seen from the repository root."""
    return [p for p in [Path("README.md"), *sorted(Path("docs").glob("*.md"))] if p.is_file()]


def fill(texts: dict[Path, str], blocks: dict[str, str]) -> dict[Path, str]:
    """Each block written into every text that holds its start marker; a block that no text holds is an error, so a
    moved or misspelt marker cannot leave a table silently stale."""
    out = dict(texts)
    for name, body in blocks.items():
        holders = [path for path, text in out.items() if f"<!-- figures:{name} -->" in text]
        if not holders:
            names = ", ".join(str(p) for p in out) or "no files"
            raise SystemExit(f"error: none of {names} has a <!-- figures:{name} --> ... <!-- /figures:{name} --> block")
        for path in holders:
            try:
                out[path] = replace_block(out[path], name, body)
            except SystemExit as exc:
                raise SystemExit(f"error: {path}: {exc}") from None
    return out


STUDY_PLOTS = ("frontier.png", "gap_vs_saving.png")


def study_block(name: str, study: Path, docs: Path, write: bool) -> str:
    """A study's results table (the first table of DIR/results.md) under the command that measured it, and its
    plots, copied into docs/ (only when `write`: --check copies nothing)."""
    text = (study / "results.md").read_text()
    command = re.search(r"^Command: (.+)$", text, re.M)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if command is None or start is None:
        raise SystemExit(f"error: {study / 'results.md'} holds no study table; run the study to its end first")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    missing = [line for line in lines if line.startswith("Not yet measured")]
    parts = [f"Measured with {command.group(1)}:", "", *lines[start:end], *(["", *missing] if missing else [])]
    for plot in STUDY_PLOTS:
        if (study / plot).exists():
            target = docs / f"{name}_{plot}"
            if write:
                target.write_bytes((study / plot).read_bytes())
            parts += ["", f"![{name}: {plot[:-4].replace('_', ' ')}]({target.name})"]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a `make run` output folder (results.json, spikedecoder/, ann/)")
    parser.add_argument("--recall", type=Path, help="JSON written by benchmarks/recall.py --json")
    parser.add_argument("--decode", type=Path, help="JSON written by benchmarks/decode.py --json")
    parser.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="fill block NAME from a finished study's DIR (repeatable)",
    )
    parser.add_argument("--files", type=Path, nargs="+", help="pages to fill (default: README.md and docs/*.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any page would change; write nothing")
    args = parser.parse_args()
    for path in (args.run, args.recall, args.decode, *(args.files or [])):
        if path is not None and not path.exists():
            raise SystemExit(f"error: {path} does not exist; run the command that writes it first")
    blocks = {}
    if args.run:
        reports = measured_energy(args.run)
        blocks["make-run"] = make_run_block(args.run, reports)
        blocks["energy"] = energy_block(args.run, reports)
        blocks["energy-presets"] = presets_block(args.run)
    if args.recall:
        blocks["recall"] = recall_block(args.recall)
    if args.decode:
        blocks["decode"] = decode_block(args.decode)
    for item in args.study:
        name, _, folder = item.partition("=")
        if not name or not folder or not (Path(folder) / "results.md").exists():
            raise SystemExit(f"error: --study {item!r}: give NAME=DIR with DIR a study's --out folder (results.md)")
        blocks[name] = study_block(name, Path(folder), Path("docs"), write=not args.check)
    old = {path: path.read_text() for path in (args.files or default_files())}
    new = fill(old, blocks)
    changed = [path for path in new if new[path] != old[path]]
    if args.check:
        sys.exit(1 if changed else 0)
    for path in changed:
        path.write_text(new[path])
    written = ", ".join(f"{p} ({', '.join(n for n in blocks if f'<!-- figures:{n} -->' in new[p])})" for p in changed)
    print(f"written: {written}" if changed else f"{', '.join(blocks) or 'nothing'}: unchanged")


if __name__ == "__main__":
    main()
