"""Decoding speed: incremental (the model's cache) vs recomputing the whole window, by context length, one model.

    python benchmarks/generation.py [--contexts 64 256 1024] [--tokens 32] [--repeats 3] [--threads N]
                                    [--preset spikedecoder] [--n-layer 4] [--n-embd 128] ...

Incremental: generate_ids(greedy) with a prompt of c tokens; the time between consecutive on_token callbacks is the
cost of one new token (one cached single-token forward + the argmax + the bookkeeping, exactly what generation
runs), the prefill excluded; the figure is the median of those intervals. max_len is set so that no slide happens
while measuring. Recompute: one forward of the c-token window + the argmax per token, the fast path a naive decoder
would take (plain model(idx), not under batch_invariant, so it is not even exact); median of the repeats.
Repeats go round-robin over the contexts, so a busy spell on a shared machine hits every context alike.
Weights are random: the cost of a forward does not depend on them (dense kernels; spikes are stored as floats).

Targets (2-core CPU): incremental >= 10x faster than recompute at context 1024, and the incremental
per-token time at 1024 within 1.5x of that at 64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.generate import generate_ids


def incremental_intervals(model: SpikeDecoder, idx: torch.Tensor, tokens: int) -> list[float]:
    """Seconds between consecutive new tokens of one greedy generation (tokens intervals)."""
    stamps: list[float] = []
    generate_ids(model, idx, tokens + 1, greedy=True, on_token=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


@torch.no_grad()
def recompute_seconds(model: SpikeDecoder, idx: torch.Tensor) -> float:
    """Seconds for one full forward of the window plus the argmax of its last position."""
    start = time.perf_counter()
    model(idx)[:, -1].argmax(-1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--tokens", type=int, default=32, help="tokens timed per incremental run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--preset", default="spikedecoder")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--timesteps", type=int, default=None, help="T (default: the preset's)")
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--residual", type=int, default=None, help="residual mode (default: the preset's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    overrides = {k: v for k, v in (("timesteps", args.timesteps), ("residual", args.residual)) if v is not None}
    cfg = SpikeDecoderConfig.from_preset(
        args.preset,
        vocab_size=args.vocab_size,
        max_len=max(args.contexts) + args.tokens + 1,  # no slide while measuring
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        **overrides,
    )
    torch.manual_seed(0)
    model = SpikeDecoder(cfg).eval()
    print(
        f"preset {cfg.preset}: n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, T {cfg.timesteps}, "
        f"residual {cfg.residual}, norm {cfg.norm}, vocab {cfg.vocab_size}, max_len {cfg.max_len}; "
        f"{model.num_params():,} params; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"incremental: generate_ids(greedy) with the cache, batch-invariant (exact), median of {args.repeats} x "
        f"{args.tokens} token intervals after a prefill of c tokens; recompute: plain model(window of c tokens) "
        f"per token, not batch-invariant (the fast path); median of {args.repeats} repeats\n",
        flush=True,
    )
    prompts = {
        c: torch.randint(0, cfg.vocab_size, (1, c), generator=torch.Generator().manual_seed(c)) for c in args.contexts
    }
    incremental_intervals(model, prompts[min(args.contexts)], 4)  # warm-up: first calls allocate
    recompute_seconds(model, prompts[min(args.contexts)])
    intervals: dict[int, list[float]] = {c: [] for c in args.contexts}
    full: dict[int, list[float]] = {c: [] for c in args.contexts}
    for _ in range(args.repeats):
        for c in args.contexts:
            intervals[c] += incremental_intervals(model, prompts[c], args.tokens)
            full[c].append(recompute_seconds(model, prompts[c]))

    inc = {c: statistics.median(intervals[c]) for c in args.contexts}
    rec = {c: statistics.median(full[c]) for c in args.contexts}
    print(
        "| context | incremental ms/token | incremental tokens/s | recompute ms/token | recompute tokens/s | speedup |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for c in args.contexts:
        print(
            f"| {c} | {inc[c] * 1e3:.1f} | {1 / inc[c]:.1f} | {rec[c] * 1e3:.1f} | {1 / rec[c]:.2f} | "
            f"{rec[c] / inc[c]:.1f}x |"
        )
    lo, hi = min(args.contexts), max(args.contexts)
    growth = inc[hi] / inc[lo]
    print(f"\nincremental per-token time, context {hi} / context {lo}: {growth:.2f}")
    print(
        f"targets: speedup at {hi} >= 10x: {'met' if rec[hi] / inc[hi] >= 10 else 'NOT met'}; "
        f"per-token time {hi}/{lo} <= 1.5: {'met' if growth <= 1.5 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
