"""Peak memory of the energy measure against the number of validation windows (`energy --windows 100000` was once
killed for memory; windows are now streamed). Each measure runs in a fresh child process; its peak RSS comes from wait4.

    python benchmarks/energy_memory.py /work/runs/dev/spikedecoder [--windows 16] [--factor 10]

Prints, for N and factor * N windows, the peak RSS of the streamed measure (what `spikedecoder energy` does: windows
counted WINDOW_BATCH at a time) and of one forward over all windows (the former behaviour), and their ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from spikedecoder.energy import energy_report, validation_windows, window_batches
    from spikedecoder.rundir import load_checkpoint, validation_ids
    path, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model, tokenizer, meta = load_checkpoint(path)
    ids = validation_ids(meta, tokenizer)
    if mode == "streamed":
        report = energy_report(model, window_batches(ids, model.config.max_len, count))
    else:
        report = energy_report(model, validation_windows(ids, model.config.max_len, count), batch=count)
    print(report["total_pj_per_token"])
    """
)


def peak_rss_mib(checkpoint: str, windows: int, mode: str) -> tuple[float, str]:
    """(peak RSS of a child that measures `windows` windows, in MiB; what it printed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, checkpoint, str(windows), mode], stdout=subprocess.PIPE, text=True, env=env
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}) for {windows} windows, {mode}")
    return usage.ru_maxrss / 1024, out.strip()  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--factor", type=int, default=10)
    args = parser.parse_args()
    small, large = args.windows, args.windows * args.factor
    print(f"| measure | {small} windows | {large} windows | ratio | pJ/token ({small} / {large}) |")
    print("|---|---|---|---|---|")
    for mode in ("streamed", "one-forward"):
        (a, pj_a), (b, pj_b) = peak_rss_mib(args.checkpoint, small, mode), peak_rss_mib(args.checkpoint, large, mode)
        print(f"| {mode} | {a:,.0f} MiB | {b:,.0f} MiB | {b / a:.2f} | {float(pj_a):,.1f} / {float(pj_b):,.1f} |")


if __name__ == "__main__":
    main()
