"""Batch-1 decoding speed of the standalone C runtime beside PyTorch: ms per token for the C spiking model (events),
the C ANN twin, the PyTorch event engine and the PyTorch ANN, one thread each.

    python benchmarks/runtime.py --checkpoint runs/make-run [--widths 128 512 1024 2048] [--quick] [--json]

Width 128: the trained pair in RUN_DIR/spikedecoder and RUN_DIR/ann. Wider: random models of the checkpoint's
configuration with --n-layer layers and d_h 32, each LIF's threshold calibrated to the trained model's firing rate for
the same role (benchmarks/decode.py `build`, reused here), and a random ANN of the same shape. Every model decodes
--tokens new tokens greedily after a --prompt token prompt of the validation text; a token's time is one decoding
step (forward through the cache or state + argmax), the median over the steps reported (C: `sd`'s median step;
PyTorch: benchmarks/decode.py `decode`, outside batch_invariant). Rounds alternate the four engines so a busy spell
of the shared machine slows all alike; the row gives the median over rounds. Peak memory: the C process's peak
resident size (getrusage), PyTorch's model tensors plus the growth of its peak resident size while decoding; file:
the exported model's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as torch_decode  # noqa: E402  (benchmarks/decode.py: the random models and PyTorch's timing)

from spikedecoder.export import export_model  # noqa: E402
from spikedecoder.neurons import LIF  # noqa: E402
from spikedecoder.rundir import load_checkpoint, validation_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SD = ROOT / "runtime" / "sd"
ENGINES = ("c-events", "c-ann", "torch-events", "torch-ann")


def build_sd() -> None:
    result = subprocess.run(["make", "-C", str(ROOT / "runtime")], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: building runtime/sd failed:\n{result.stderr}")


def run_c(binary: Path, prompt: str, tokens: int) -> dict:
    """One greedy run of sd; its statistics line (median step, peak RSS, spikes and energy per token)."""
    result = subprocess.run(
        [str(SD), str(binary), "-p", prompt, "-n", str(tokens), "-t", "0", "-q"], capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"error: {SD} failed: {result.stderr}")
    line = next(x for x in result.stderr.splitlines() if x.startswith("stats:"))
    return json.loads(line.removeprefix("stats:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/make-run", help="run directory holding spikedecoder/ and ann/")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="default 128 512 1024 2048")
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the random wider models")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="widths 128 and 1024, 64 tokens, 2 rounds")
    parser.add_argument("--json", action="store_true", help='print {"rows": [...]} only')
    args = parser.parse_args()
    if args.quick:
        args.widths = args.widths or [128, 1024]
        args.tokens, args.rounds = 64, 2
    args.widths = args.widths or [128, 512, 1024, 2048]
    args.calibrate = "step"
    torch.set_num_threads(1)
    say = (lambda *a, **k: None) if args.json else print

    run = Path(args.checkpoint)
    if not (run / "spikedecoder").exists() or not (run / "ann").exists():
        sys.exit(f"error: {run} needs spikedecoder/ and ann/ runs (make run writes runs/make-run)")
    build_sd()
    trained, tokenizer, meta = load_checkpoint(run / "spikedecoder")
    ann_trained = load_checkpoint(run / "ann")[0]
    # the loop LIF gives the fused kernel's spikes without compiling it (the calibration only runs forwards); the
    # random wider models take the setting from this config
    trained.config.lif_backend = "loop"
    for m in trained.modules():
        if isinstance(m, LIF):
            m.backend = "loop"
    text = validation_ids(meta, tokenizer)
    prompt_ids = text[: args.prompt][None]
    prompt = tokenizer.decode(prompt_ids[0].tolist())
    cfg = trained.config
    calib_ids = text[args.prompt : args.prompt + 4 * cfg.max_len].reshape(4, -1)
    targets = torch_decode.lif_rates(trained, calib_ids, "step")
    say(f"checkpoint {run}: width {cfg.n_embd}, {cfg.n_layer} layers; prompt {args.prompt}, {args.tokens} tokens")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            ann, dense, events = torch_decode.build(width, args, trained, ann_trained, targets, calib_ids)
            files = {"c-events": Path(tmp) / f"snn{width}.bin", "c-ann": Path(tmp) / f"ann{width}.bin"}
            export_model(dense, tokenizer, files["c-events"])
            export_model(ann, tokenizer, files["c-ann"])
            torch_models = {"torch-events": events, "torch-ann": ann}
            for m in torch_models.values():  # warm-up (first calls allocate, build kernels)
                torch_decode.decode(m, prompt_ids, 4)
            ms = {e: [] for e in ENGINES}
            peak = {e: 0.0 for e in ENGINES}
            extra: dict[str, dict] = {}
            for _ in range(args.rounds):
                for e in ENGINES:
                    if e.startswith("c-"):
                        stats = run_c(files[e], prompt, args.tokens)
                        ms[e].append(stats["median_ms"])
                        peak[e] = max(peak[e], stats["peak_rss_kib"] / 1024)
                        extra[e] = {"spikes_per_token": stats["spikes_per_token"],
                                    "pj_per_token": stats["pj_per_token"]}  # fmt: skip
                    else:
                        times, grown = torch_decode.decode(torch_models[e], prompt_ids, args.tokens)
                        ms[e].append(statistics.median(times) * 1e3)
                        model_mib = torch_decode.tensor_bytes(torch_models[e]) / 2**20
                        peak[e] = max(peak[e], model_mib + grown / 2**20)
            for e in ENGINES:
                t = statistics.median(ms[e])
                row = {"width": width, "engine": e, "n_layer": dense.config.n_layer, "ms_per_token": round(t, 4),
                       "tokens_per_s": round(1e3 / t, 1), "peak_mib": round(peak[e], 1)}  # fmt: skip
                if e in files:
                    row["file_mib"] = round(files[e].stat().st_size / 2**20, 2)
                    row.update(extra[e])
                rows.append(row)
                say(f"width {width:>5} {e:<13} {t:8.3f} ms/token {1e3 / t:9.1f} tokens/s  peak {peak[e]:7.1f} MiB")

    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print("\n| width | layers | engine | ms/token | tokens/s | peak MiB | file MiB | pJ/token |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['width']} | {r['n_layer']} | {r['engine']} | {r['ms_per_token']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_mib']:.1f} | {r.get('file_mib', '')} | {r.get('pj_per_token', '')} |")  # fmt: skip
    print("\n| width | c-events / c-ann | c-events / torch-events | c-ann / torch-ann |")
    print("|---:|---:|---:|---:|")
    for width in args.widths:
        tps = {r["engine"]: r["tokens_per_s"] for r in rows if r["width"] == width}
        print(f"| {width} | {tps['c-events'] / tps['c-ann']:.2f} | {tps['c-events'] / tps['torch-events']:.1f} | "
              f"{tps['c-ann'] / tps['torch-ann']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
