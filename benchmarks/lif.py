"""Forward + backward time of the LIF neuron: the autograd loop vs the fused backend (compiled kernels, hand BPTT).

    python benchmarks/lif.py [--widths 512 2048] [--timesteps 4] [--rows 4096] [--repeats 10] [--device cpu]

Shapes are those of a model layer: (T, B*S, width) with T=4 and B*S = 32*128 = 4096 tokens, width 512 (n_embd) and
2048 (the MLP's hidden layer). Each backend is warmed up first (the fused one compiles there, ~10 s per variant), then
one iteration is LIF forward plus the backward of a fixed upstream gradient, the two backends timed in alternating
rounds; the median over repeats is reported, in ms, with the speedup loop / fused (the target is >= 3x).
The spikes and input gradients of the two backends are compared once, so the timing is of two implementations that
agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spikedecoder.neurons import LIF


def step(lif: LIF, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x.grad = None
    spikes = lif(x)
    spikes.backward(upstream)
    return spikes, x.grad


def median_ms(lifs: dict[str, LIF], x: torch.Tensor, upstream: torch.Tensor, repeats: int, device: torch.device):
    """Median ms per backend, timed in alternating rounds (loop, fused, then fused, loop, ...) so that a busy spell
    of a shared machine slows both alike instead of one of them."""
    times: dict[str, list[float]] = {name: [] for name in lifs}
    names = list(lifs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(lifs[name], x, upstream)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=32 * 128, help="tokens per call, B*S")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--threshold", choices=("none", "layer", "channel"), default="none")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"T={args.timesteps}, rows={args.rows}, threshold={args.threshold}, median of {args.repeats}"
    )
    print(f"{'width':>6} {'loop ms':>10} {'fused ms':>10} {'speedup':>8}")
    speedups = []
    for width in args.widths:
        gen = torch.Generator().manual_seed(width)
        shape = (args.timesteps, args.rows, width)
        x = (torch.randn(shape, generator=gen) * 1.5 + 0.8).to(device).requires_grad_()
        upstream = torch.randn(shape, generator=gen).to(device)
        kw = dict(learnable_threshold=args.threshold, channels=width)
        loop, fused = LIF(**kw).to(device), LIF(**kw, backend="fused").to(device)
        results = {}
        for name, lif in (("loop", loop), ("fused", fused)):
            for _ in range(args.warmup):  # the fused backend compiles here
                results[name] = [t.detach().clone() for t in step(lif, x, upstream)]
        assert torch.equal(results["loop"][0], results["fused"][0]), "the backends disagree on the spikes"
        diff = (results["loop"][1] - results["fused"][1]).abs().max() / results["loop"][1].abs().max()
        assert diff <= 1e-6, f"input gradients differ by {diff:.2e} (relative)"
        ms = median_ms({"loop": loop, "fused": fused}, x, upstream, args.repeats, device)
        speedups.append(ms["loop"] / ms["fused"])
        print(f"{width:>6} {ms['loop']:>10.2f} {ms['fused']:>10.2f} {speedups[-1]:>7.2f}x")
    verdict = "meets" if min(speedups) >= 3 else "misses"
    print(f"minimum speedup {min(speedups):.2f}x: {verdict} the >= 3x target")


if __name__ == "__main__":
    main()
