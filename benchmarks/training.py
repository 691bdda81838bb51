"""Training speed of the ANN and of the SpikeDecoder (T timesteps) at equal width and depth, in one run.

    python benchmarks/training.py [--n-layer 2] [--n-head 4] [--n-embd 128] [--max-len 64] [--batch-size 32]
                                  [--timesteps 4] [--rounds 6] [--steps 3] [--threads N] [--device cpu|cuda]
                                  [--no-loop] [--json FILE]

One training step is exactly train()'s: forward (under bf16 autocast on a GPU), cross-entropy, backward, gradient
clipping, AdamW. For each model the run prints the median step time, training tokens/s, the peak tensor memory of a
step, the matmul FLOPs of a step (torch.utils.flop_counter: forward + backward) and the fraction of the machine's
matmul throughput they achieve, that throughput being a large GEMM timed in the same run, on the same threads. Then the
acceptance figure: SNN step time / (T x ANN step time), the SNN using the fused LIF. With --no-loop left out, the SNN
with the plain autograd LIF loop is timed too (the fused kernel's gain on a whole training step).

Timing method. Models are timed in interleaved rounds (ANN, SNN, SNN-loop, then the reverse order in the next round;
`--steps` steps per model per round, after a warm-up that also compiles the fused LIF), and medians are taken over all
timed steps: a slow spell of a shared machine hits every model alike. Two clocks are reported: wall time, and (on the
CPU) the CPU time of this process, which does not count time spent waiting for other processes and so is the stable
figure on a shared machine (with N threads it counts N x the busy time, for every model alike). On a machine shared
with other busy processes, run with --threads 1: with several threads every parallel op waits for its slowest thread,
and the step times then measure the other processes more than the models (the script warns when the load is high).

Peak memory: on a GPU torch.cuda.max_memory_allocated over one step; on the CPU the same quantity rebuilt from the
allocator events of the profiler (tensors alive before the step: weights, gradients, optimizer state, batch, plus the
highest point of the allocations made during it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.optim import lm_loss, param_groups
from spikedecoder.runtime import Runtime

ZERO_GRAD = "benchmark.zero_grad"


class Bench:
    """A model, its optimizer and one fixed batch; `step()` is one training step of train()."""

    def __init__(self, name: str, cfg: SpikeDecoderConfig, rt: Runtime, batch: tuple[torch.Tensor, torch.Tensor]):
        self.name, self.cfg, self.rt = name, cfg, rt
        torch.manual_seed(0)
        self.model = SpikeDecoder(cfg).to(rt.device).train()
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        self.x, self.y = (t.to(rt.device) for t in batch)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def step(self) -> None:
        with self.rt.autocast():
            loss = lm_loss(self.model(self.x).float(), self.y)
        with record_function(ZERO_GRAD):  # a marker for peak_bytes
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def timed_step(self) -> None:
        sync(self.rt.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        sync(self.rt.device)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()

    def resident_bytes(self) -> int:
        """Tensors alive between steps: weights, gradients, optimizer state, the batch."""
        tensors = [*self.model.parameters(), self.x, self.y]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.opt.state.values() for v in state.values() if torch.is_tensor(v)]
        tensors += list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def peak_bytes(self) -> int:
        if self.rt.device.type == "cuda":
            sync(self.rt.device)
            torch.cuda.reset_peak_memory_stats(self.rt.device)
            self.step()
            sync(self.rt.device)
            return torch.cuda.max_memory_allocated(self.rt.device)
        resident = self.resident_bytes()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        events = prof.profiler.kineto_results.events()
        changes = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"]
        # the profiler sees no free of a block allocated before it started: put back that of the old gradients
        changes += [(e.end_ns(), -grads) for e in events if e.name() == ZERO_GRAD]
        live = peak = 0
        for _, nbytes in sorted(changes):
            live += nbytes
            peak = max(peak, live)
        return resident + peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_flops_per_s(rt: Runtime, n: int, repeats: int = 5) -> tuple[float, float]:
    """Best (wall, CPU-time) FLOP/s of an n x n x n matmul in the dtype the training matmuls use."""
    dtype = rt.amp_dtype or torch.float32
    a = torch.randn(n, n, device=rt.device, dtype=dtype)
    b = torch.randn(n, n, device=rt.device, dtype=dtype)
    a @ b
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        sync(rt.device)
        wall, cpu = time.perf_counter(), time.process_time()
        a @ b
        sync(rt.device)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    flops = 2 * n**3
    return flops / best_wall, flops / max(best_cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=65, help="65: the character vocabulary of the corpus")
    parser.add_argument("--timesteps", type=int, default=4, help="T of the SNN")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--gemm-size", type=int, default=None, help="n of the reference GEMM (1024 CPU, 8192 GPU)")
    parser.add_argument("--no-loop", action="store_true", help="skip the SNN with the plain LIF loop")
    parser.add_argument("--target", type=float, default=1.3, help="acceptance bound on the step-time ratio")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp32": None, "auto": torch.bfloat16 if device.type == "cuda" else None}
    rt = Runtime(device, amp[args.precision])
    shape = dict(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        max_len=args.max_len,
        vocab_size=args.vocab_size,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.max_len + 1), generator=g)
    batch = (ids[:, :-1], ids[:, 1:])
    benches = [
        Bench("ann", SpikeDecoderConfig.from_preset("ann", **shape), rt, batch),
        Bench(
            "snn",
            SpikeDecoderConfig.from_preset("spikedecoder", **shape, timesteps=args.timesteps, lif_backend="fused"),
            rt,
            batch,
        ),
    ]
    if not args.no_loop:
        benches.append(
            Bench(
                "snn-loop",
                SpikeDecoderConfig.from_preset("spikedecoder", **shape, timesteps=args.timesteps, lif_backend="loop"),
                rt,
                batch,
            )
        )
    print(
        f"device {device} ({torch.get_num_threads()} threads), precision {args.precision}, torch {torch.__version__}; "
        + ", ".join(f"{k}={v}" for k, v in shape.items())
        + f", batch {args.batch_size}, T={args.timesteps}",
        flush=True,
    )
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if device.type == "cpu" and torch.get_num_threads() > 1 and load > cores:
        print(
            f"warning: the machine is busy (load {load:.1f} on {cores} cores): with {torch.get_num_threads()} threads "
            "every parallel op waits for its slowest thread and the timings measure the other processes; "
            "use --threads 1 for figures that compare the models",
            flush=True,
        )
    for b in benches:
        for _ in range(args.warmup):
            b.step()
    gemm_n = args.gemm_size or (8192 if device.type == "cuda" else 1024)
    gemm_before = gemm_flops_per_s(rt, gemm_n)
    for r in range(args.rounds):
        for b in benches if r % 2 == 0 else benches[::-1]:
            for _ in range(args.steps):
                b.timed_step()
    gemm_after = gemm_flops_per_s(rt, gemm_n)
    gemm = (max(gemm_before[0], gemm_after[0]), max(gemm_before[1], gemm_after[1]))
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    tokens = args.batch_size * args.max_len

    results: dict = {"config": {**vars(args), "threads": torch.get_num_threads()}, "gemm_n": gemm_n, "models": {}}
    results["gemm_flops_per_s"] = dict(zip(clocks, gemm, strict=False))
    print(
        f"\nreference GEMM {gemm_n}^3: " + ", ".join(f"{gemm[i] / 1e9:.1f} GFLOP/s ({c})" for i, c in enumerate(clocks))
    )
    header = f"{'model':<9} {'params':>9} {'clock':>5} {'step ms':>9} {'tokens/s':>9} {'GFLOP/step':>10}"
    header += f" {'GFLOP/s':>8} {'of GEMM':>7} {'peak MiB':>9}"
    print(header)
    for b in benches:
        flops, peak = b.flops(), b.peak_bytes()
        row = {"params": b.model.num_params(), "flops_per_step": flops, "peak_bytes": peak}
        for i, clock in enumerate(clocks):
            t = statistics.median(b.wall if clock == "wall" else b.cpu)
            row[clock] = {
                "step_s": t,
                "min_step_s": min(b.wall if clock == "wall" else b.cpu),
                "tokens_per_s": tokens / t,
                "flops_per_s": flops / t,
                "fraction_of_gemm": flops / t / gemm[i],
            }
            print(
                f"{b.name:<9} {row['params']:>9,} {clock:>5} {t * 1e3:>9.1f} {tokens / t:>9.0f} {flops / 1e9:>10.2f}"
                f" {flops / t / 1e9:>8.1f} {flops / t / gemm[i]:>7.1%} {peak / 2**20:>9.1f}"
            )
        results["models"][b.name] = row

    print(f"\nSNN step time / (T x ANN step time), T={args.timesteps}, fused LIF (target <= {args.target}):")
    verdicts = {}
    for clock in clocks:
        ann, snn = (results["models"][k][clock]["step_s"] for k in ("ann", "snn"))
        ratio = snn / (args.timesteps * ann)
        verdicts[clock] = ratio
        print(f"  {clock:>4} clock: {ratio:.2f}  {'PASS' if ratio <= args.target else 'FAIL'}")
    results["ratio"] = verdicts
    if "snn-loop" in results["models"]:
        print("fused LIF vs plain loop, whole SNN training step:")
        for clock in clocks:
            loop, fused = (results["models"][k][clock]["step_s"] for k in ("snn-loop", "snn"))
            results.setdefault("loop_over_fused", {})[clock] = loop / fused
            print(f"  {clock:>4} clock: the fused step is {loop / fused:.2f}x faster")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
