"""In-context recall probes that separate attention mechanisms: multi-query associative recall and copy.

    python benchmarks/recall.py [--variants ann window-2 whole-context spikedecoder] [--steps N] [--seed S]
                                [--jobs 2] [--json] [--set model.KEY=VALUE ...]

MQAR (Arora et al. 2023, "Zoology"): N key-value pairs k1 v1 ... kN vN (distinct keys from 32 key tokens, values
from 32 value tokens), then every key again in a random order, each followed by its value. The model must predict
the value after each queried key; accuracy (and the loss) count only those N answers. N = 4, 8 and 16.
Copy: a string of 24 distinct tokens drawn from the 64 content tokens, a separator, the same string again; accuracy
on the 24 tokens of the second copy (the first of them is predicted from the separator).

Nothing here can be solved without looking back: a value or a copied token is random given its immediate
predecessors, so a model that sees only the last two tokens stays at chance (1/32 for MQAR, about 1/64 for copy).

One model per variant, trained from scratch on a fresh random batch every step (infinite data), with the four tasks
mixed in every batch (each sequence padded to 64 tokens), one CPU thread per variant, training matmuls in bf16
where the CPU has them natively (`--precision`; about 4.5 minutes per spiking variant with two at once on 2 cores,
the ANN about 1.5; fp32 takes about 7.5). Evaluation runs in fp32 on a fixed set
drawn from a separate seed (256 sequences per task). Variants:
    ann            the ANN (softmax attention)
    window-2       the spiking model attending to the current and previous token (make run's setting until 2026-12-01)
    whole-context  the spiking model with a plain running sum over the whole context (the preset's old default)
    spikedecoder   the `spikedecoder` preset as shipped (window heads beside whole-context heads, key convolution,
                   coincidence normaliser of squared coincidence counts, threshold 0.5, ATan surrogate alpha 1,
                   graded spikes: up to 4 per neuron, Q, K and V too)
    make-run       make run's spiking model (configs/run.toml: its neurons, graded spikes, token convolutions and
                   norms) with the preset's whole-context heads beside its window heads
window-2 and whole-context keep the neuron settings they had (binary spikes, threshold 1, alpha 2, no key
convolution). All at 2 layers x 128 wide, 4 heads, context 64 and T = 1 (one timestep per token: the probes' scale,
like the width; at T = 4 a 3,000-step run takes about 25 minutes per variant here); the presets' other defaults
untouched.
`--set model.KEY=VALUE` changes every spiking variant (for experiments; the reported rows use none).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.config import PRESETS
from spikedecoder.optim import param_groups
from spikedecoder.runtime import cpu_has_bf16
from spikedecoder.settings import load_config_file, model_settings, parse_value

PAD, SEP = 0, 1
N_KEYS = N_VALUES = 32
KEYS = torch.arange(2, 2 + N_KEYS)
VALUES = torch.arange(2 + N_KEYS, 2 + N_KEYS + N_VALUES)
VOCAB = 2 + N_KEYS + N_VALUES
SEQ = 64
COPY_LEN = 24
TASKS = [("mqar", 4), ("mqar", 8), ("mqar", 16), ("copy", None)]
MODEL = dict(vocab_size=VOCAB, max_len=SEQ, n_layer=2, n_head=4, n_embd=128, timesteps=1)
# the settings window-2 and whole-context had: binary spikes, threshold 1, alpha 2, plain counts, no key convolution
OLD_ATTENTION = dict(
    attn_norm="none",
    attn_key_conv=False,
    v_threshold=1.0,
    surrogate_alpha=2.0,
    attn_power=1,
    spike_levels=1,
    qkv_levels=1,
)
RUN_TOML = Path(__file__).resolve().parents[1] / "configs" / "run.toml"
WHOLE_CONTEXT_HEADS = ("attn_window", "attn_norm", "attn_key_conv", "attn_power")


def make_run_settings() -> dict[str, Any]:
    """configs/run.toml's spiking model (its neurons, graded spikes, convolutions, norms) at the probes' sizes, with
    the `spikedecoder` preset's whole-context heads beside its window heads."""
    settings = model_settings(load_config_file(str(RUN_TOML), []), "spikedecoder")
    settings = {k: v for k, v in settings.items() if k not in MODEL and k not in WHOLE_CONTEXT_HEADS}
    return settings | {k: PRESETS["spikedecoder"][k] for k in WHOLE_CONTEXT_HEADS}


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ann": ("ann", {}),
    "window-2": ("spikedecoder", {**OLD_ATTENTION, "attn_window": 2, "av_norm": True}),
    "whole-context": ("spikedecoder", {**OLD_ATTENTION, "attn_window": None, "av_norm": False}),
    "spikedecoder": ("spikedecoder", {}),
    "make-run": ("spikedecoder", make_run_settings()),
}


# ---------------------------------------------------------------------------------------------- data
def mqar(n: int, pairs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, SEQ) tokens and a boolean mask of the positions whose next token is an answer."""
    keys = KEYS[torch.rand(n, N_KEYS, generator=gen).argsort(-1)[:, :pairs]]
    values = VALUES[torch.randint(0, N_VALUES, (n, pairs), generator=gen)]
    order = torch.rand(n, pairs, generator=gen).argsort(-1)
    context = torch.stack([keys, values], -1).flatten(1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).flatten(1)
    seq = torch.cat([context, queries], 1)
    answer = torch.zeros_like(seq, dtype=torch.bool)
    answer[:, 2 * pairs :: 2] = True  # a queried key: the next token is its value
    return _pad(seq), _pad(answer)


def copy(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    content = torch.arange(2, VOCAB)
    text = content[torch.rand(n, len(content), generator=gen).argsort(-1)[:, :COPY_LEN]]
    seq = torch.cat([text, torch.full((n, 1), SEP), text], 1)
    answer = torch.zeros_like(seq, dtype=torch.bool)
    answer[:, COPY_LEN : 2 * COPY_LEN] = True  # the separator and the second copy but its last token
    return _pad(seq), _pad(answer)


def _pad(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, SEQ - x.shape[1]), value=PAD if x.dtype != torch.bool else False)


def batch(task: tuple[str, int | None], n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return mqar(n, task[1], gen) if task[0] == "mqar" else copy(n, gen)


def mixed_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [batch(t, n // len(TASKS), gen) for t in TASKS]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------- one variant
def build(variant: str, sets: dict[str, Any]) -> SpikeDecoder:
    preset, overrides = VARIANTS[variant]
    extra = sets if preset != "ann" else {}
    return SpikeDecoder(SpikeDecoderConfig.from_preset(preset, **{**MODEL, **overrides, **extra}))


def loss_and_hits(model: SpikeDecoder, seq: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(seq[:, :-1])
    target, mask = seq[:, 1:], answer[:, :-1]
    picked = logits[mask]
    return F.cross_entropy(picked, target[mask]), (picked.argmax(-1) == target[mask]).float()


@torch.no_grad()
def evaluate(model: SpikeDecoder, seed: int, per_task: int = 256) -> list[float]:
    model.eval()
    gen = torch.Generator().manual_seed(seed + 10_000)
    accuracies = []
    for task in TASKS:
        seq, answer = batch(task, per_task, gen)
        hits = torch.cat([loss_and_hits(model, s, a)[1] for s, a in zip(seq.split(64), answer.split(64), strict=True)])
        accuracies.append(hits.mean().item())
    model.train()
    return accuracies


def run_variant(
    variant: str,
    steps: int,
    seed: int,
    sets: dict[str, Any],
    lr: float,
    batch_size: int,
    verbose: bool = False,
    threads: int = 1,
    bf16: bool = False,
) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build(variant, sets)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    warmup, start = min(100, steps // 10), time.perf_counter()
    for step in range(steps):
        scale = (
            (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.1 if step >= warmup else scale)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_and_hits(model, *mixed_batch(batch_size, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if verbose and (step + 1) % 100 == 0:
            print(f"{variant} step {step + 1} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s", flush=True)
    accuracies = evaluate(model, seed)
    return {
        "variant": variant,
        "accuracies": accuracies,
        "seconds": time.perf_counter() - start,
        "final_loss": loss.item(),
        "config": model.config.to_dict(),
    }


def _worker(args: tuple) -> dict:
    return run_variant(*args)


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a worker stops when the process that started it is gone (killed), instead of training on
    and holding a core for minutes."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------------------------------- CLI
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3000, help="training steps per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (a quarter per task)")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per variant")
    parser.add_argument(
        "--precision",
        choices=("native", "fp32", "bf16"),
        default="native",
        help="training matmuls: bf16 autocast (evaluation stays fp32); native = bf16 where the CPU has it natively, "
        "else fp32",
    )
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE", help="spiking variants only")
    parser.add_argument("--json", action="store_true", help="print only the JSON results object")
    parser.add_argument("--verbose", action="store_true", help="print the training loss every 100 steps")
    args = parser.parse_args()
    sets = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("model."):
            parser.error(f"--set {item!r}: use model.KEY=VALUE, e.g. --set model.attn_window=2")
        sets[key.removeprefix("model.")] = parse_value(value)
    bf16 = args.precision == "bf16" or (args.precision == "native" and cpu_has_bf16())
    jobs = [
        (v, args.steps, args.seed, sets, args.lr, args.batch_size, args.verbose, args.threads, bf16)
        for v in args.variants
    ]
    if args.jobs > 1 and len(jobs) > 1:
        workers = min(args.jobs, len(jobs))
        with mp.get_context("spawn").Pool(workers, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            runs = pool.map(_worker, jobs)
    else:
        runs = [_worker(j) for j in jobs]
    results = [
        {"variant": r["variant"], "task": task, "pairs": pairs, "accuracy": round(acc, 4)}
        for r in runs
        for (task, pairs), acc in zip(TASKS, r["accuracies"], strict=True)
    ]
    if args.json:
        print(json.dumps({"results": results}))
        return
    print(f"{'variant':<14} {'mqar-4':>7} {'mqar-8':>7} {'mqar-16':>7} {'copy':>7} {'train s':>8}")
    for r in runs:
        cells = " ".join(f"{a:>7.3f}" for a in r["accuracies"])
        print(f"{r['variant']:<14} {cells} {r['seconds']:>8.0f}")
    print(
        f"chance: mqar {1 / N_VALUES:.3f}, copy about {1 / (VOCAB - 2):.3f}; {args.steps} steps, seed {args.seed}, "
        f"training matmuls {'bf16' if bf16 else 'fp32'}"
    )


if __name__ == "__main__":
    main()
