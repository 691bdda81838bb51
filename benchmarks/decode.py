"""Batch-1 decoding speed: the ANN with its KV cache, the spiking model dense, the spiking model event-driven.

    python benchmarks/decode.py [--widths 128 512 1024 2048] [--checkpoint runs/make-run/spikedecoder]
                                [--n-layer 4] [--prompt 64] [--tokens 128] [--rounds 3] [--json]

Each engine decodes `--tokens` new tokens greedily after a prompt of `--prompt` tokens of the checkpoint's
validation text, through the model's cache (prefill once, then one single-token forward per token); a token's time
is the forward + argmax, the median over every token of every round is reported (a slide past max_len re-prefills:
those few tokens fall outside the median). All engines run outside `batch_invariant()`, each at its fastest
(generate() pads every Linear to 16 rows for bitwise batch invariance, which would slow the ANN's GEMV most).
Rounds alternate the engines, so a busy spell of the shared machine slows all alike. One intra-op thread.

Width 128: the trained checkpoint as it is (make run trains 2 layers, not --n-layer) and its ANN twin (the sibling
`ann` run; a random ANN of the same shape if there is none). Wider: random models of the checkpoint's configuration
with --n-layer layers and d_h 32, each LIF's threshold calibrated (bisection, in forward order, on its real input)
so that it fires at the rate the trained model's LIF of the same role has on the same text (block i takes the
trained block min(i, last)); the rates reached are printed.

Weight bytes read per token: ann and dense read every weight (the embedding: two rows); events reads, per event
Linear, the union over the T steps of its active inputs' rows (the compiled kernel reads each once and adds it into
every step at which it spikes; the embedding_bag fallback, SPIKEDECODER_EVENT_KERNEL=0, reads it again from cache at
the other steps), plus every other parameter; the rows are counted by hooks in an untimed decoding pass of its own
(the hooks cost time). Peak memory: the model's tensors plus the growth of the process's peak resident size (VmHWM,
reset before each engine) while decoding.

Check on the trained model (width 128): greedy generation of --check-tokens tokens through generate() (cache,
batch-invariant, sliding as shipped) by the dense and the event model: identical tokens, identical spikes at every
LIF of every forward, logits within 1e-5 relative. Targets: at width 1024 events tokens/s >= ann (aim 2x)
and >= 3x dense.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.events import EventLinear, count_mismatches, to_events
from spikedecoder.generate import _Window, generate_ids
from spikedecoder.neurons import LIF
from spikedecoder.rundir import load_checkpoint, validation_ids

ENGINES = ("ann", "dense", "events")


# ---------------------------------------------------------------------------------------------- firing rates
def rate(spikes: torch.Tensor, kind: str) -> float:
    """Fraction of neurons firing per step ("step"), or at any of the T steps of a token ("union")."""
    return float((spikes.bool().any(0) if kind == "union" else spikes).float().mean())


@torch.no_grad()
def lif_rates(model: SpikeDecoder, ids: torch.Tensor, kind: str = "step") -> dict[str, float]:
    """Firing rate of every LIF on one forward of ids."""
    rates: dict[str, float] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, out, n=n: rates.__setitem__(n, rate(out, kind)))
        for n, m in model.named_modules()
        if isinstance(m, LIF)
    ]
    model(ids)
    for h in hooks:
        h.remove()
    return rates


def role(name: str, last_block: int) -> str:
    """The trained LIF a random model's LIF copies its rate from: same name, block index clipped."""
    return re.sub(r"blocks\.(\d+)\.", lambda m: f"blocks.{min(int(m.group(1)), last_block)}.", name)


@torch.no_grad()
def calibrate(model: SpikeDecoder, targets: dict[str, float], ids: torch.Tensor, last_block: int, kind: str) -> None:
    """One forward; before each LIF runs, bisect its threshold (log scale) on its actual input to the target rate.
    Forward order is dependency order, so every LIF is calibrated on calibrated upstream spikes."""

    def tune(module: LIF, inputs: tuple, name: str) -> None:
        target = targets[role(name, last_block)]
        lo, hi = -9.0, 5.0  # log2 threshold
        for _ in range(24):
            mid = (lo + hi) / 2
            module.v_threshold.fill_(2.0**mid)
            if rate(module.forward(inputs[0]), kind) > target:  # forward: no hooks
                lo = mid
            else:
                hi = mid
        module.v_threshold.fill_(2.0 ** ((lo + hi) / 2))

    hooks = [
        m.register_forward_pre_hook(lambda m, i, n=n: tune(m, i, n))
        for n, m in model.named_modules()
        if isinstance(m, LIF)
    ]
    model(ids)
    for h in hooks:
        h.remove()


# ---------------------------------------------------------------------------------------------- bytes read
class RowsRead:
    """Counts, over single-token decoding steps, what each event Linear reads: the weight rows of the union over T
    of its active inputs (and its bias), with the per-step and union input rates."""

    def __init__(self, model: torch.nn.Module):
        self.tokens: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.active: dict[str, int] = {}  # active inputs summed over steps
        self.union: dict[str, int] = {}  # union over T of the active inputs
        self.fan_in: dict[str, int] = {}
        self.steps: dict[str, int] = {}
        self.hooks = []
        for name, m in model.named_modules():
            if isinstance(m, EventLinear):
                self.hooks.append(m.register_forward_pre_hook(lambda m, i, n=name: self.record(n, m, i[0])))

    def record(self, name: str, module: EventLinear, x: torch.Tensor) -> None:
        if x.dim() >= 2 and x.shape[0] > 1 and x.stride(0) == 0:
            return  # time-invariant: the module calls itself on step 0, recorded then
        active = x != 0
        union = active.any(0) if x.dim() >= 3 else active  # (B, S, in): one union per token
        if union[..., 0].numel() != 1:
            return  # a prefill: count single-token decoding steps only
        row_bytes = module.rows.shape[1] * module.rows.element_size()
        bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
        self.tokens[name] = self.tokens.get(name, 0) + 1
        self.bytes[name] = self.bytes.get(name, 0) + int(union.sum()) * row_bytes + bias
        self.active[name] = self.active.get(name, 0) + int(active.sum())
        self.union[name] = self.union.get(name, 0) + int(union.sum())
        self.steps[name] = self.steps.get(name, 0) + (x.shape[0] if x.dim() >= 3 else 1)
        self.fan_in[name] = x.shape[-1]

    def per_token(self) -> int:
        """Bytes the event Linears read per decoded token."""
        return round(sum(b / self.tokens[n] for n, b in self.bytes.items()))

    def rates(self) -> dict[str, tuple[float, float]]:
        """(active per step, union over T) as fractions of the inputs, per event Linear."""
        return {
            n: (self.active[n] / (self.steps[n] * self.fan_in[n]), self.union[n] / (self.tokens[n] * self.fan_in[n]))
            for n in self.tokens
        }

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def dense_weight_bytes(model: torch.nn.Module) -> int:
    """Every parameter/buffer read per token, but only two rows (token, position) of each embedding table."""
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dtype == torch.bool or not t.is_floating_point():
            continue
        total += (2 * t.shape[1] if name.startswith("embed.") and t.dim() == 2 else t.numel()) * t.element_size()
    return total


def event_weight_bytes(model: torch.nn.Module, rows_read_bytes: int) -> int:
    """Rows read by event Linears per token, plus every other tensor (embedding: two rows)."""
    events = {id(t) for m in model.modules() if isinstance(m, EventLinear) for t in (m.rows, m.bias) if t is not None}
    rest = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in events or not t.is_floating_point():
            continue
        rest += (2 * t.shape[1] if name.startswith("embed.") and t.dim() == 2 else t.numel()) * t.element_size()
    return rest + rows_read_bytes


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------------------------------------- timing
def vm(field: str) -> int:
    """A /proc/self/status size in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> tuple[list[float], int]:
    """Seconds per new token (forward through the cache + argmax) and the peak resident growth while decoding."""
    gc.collect()
    reset_peak()
    base = vm("VmRSS")
    seq = torch.empty(1, prompt.shape[1] + tokens, dtype=torch.long)
    seq[:, : prompt.shape[1]] = prompt
    n = prompt.shape[1]
    window = _Window(model, keep=max(1, model.config.max_len // 2), incremental=True)
    seq[0, n] = window.next_logits(seq[:, :n]).argmax(-1)[0]  # prefill and the first new token (not timed)
    n += 1
    times = []
    for _ in range(tokens - 1):
        start = time.perf_counter()
        seq[0, n] = window.next_logits(seq[:, :n]).argmax(-1)[0]
        times.append(time.perf_counter() - start)
        n += 1
    return times, max(0, vm("VmHWM") - base)


# ---------------------------------------------------------------------------------------------- trained check
@torch.no_grad()
def check_trained(dense: SpikeDecoder, events: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> dict:
    """generate() greedy with each engine, recording every LIF's spikes and the logits of every forward."""

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        spikes: dict[str, list[torch.Tensor]] = {}
        logits: list[torch.Tensor] = []
        hooks = [
            m.register_forward_hook(lambda m, i, out, n=n: spikes.setdefault(n, []).append(out.bool().flatten()))
            for n, m in model.named_modules()
            if type(m).__name__ in ("LIF", "EventLIF")
        ]
        hooks.append(model.register_forward_hook(lambda m, i, out: logits.append(out[:, -1].clone())))
        out = generate_ids(model, prompt, tokens, greedy=True)
        for h in hooks:
            h.remove()
        return out, logits, {k: torch.cat(v) for k, v in spikes.items()}

    tok_d, log_d, sp_d = run(dense)
    tok_e, log_e, sp_e = run(events)
    mismatches, total = count_mismatches(sp_d, sp_e)
    rel = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(log_d, log_e, strict=True))
    return {
        "tokens_identical": bool(torch.equal(tok_d, tok_e)),
        "spike_mismatches": mismatches,
        "spikes": total,
        "max_logit_rel_diff": rel,
        "passed": bool(torch.equal(tok_d, tok_e)) and mismatches == 0 and rel <= 1e-5,
    }


# ---------------------------------------------------------------------------------------------- models
def build(width: int, args, trained: SpikeDecoder, ann_trained: SpikeDecoder | None, targets, ids):
    """(ann, dense, events) for one width; width 128 = the checkpoint itself."""
    if width == trained.config.n_embd:
        dense = trained
        ann = ann_trained
        if ann is None:
            torch.manual_seed(0)
            ann = SpikeDecoder(SpikeDecoderConfig.from_preset("ann", **_shape(trained.config))).eval()
    else:
        shape = dict(n_embd=width, n_head=max(1, width // 32), n_layer=args.n_layer)
        shape["max_len"] = max(trained.config.max_len, args.prompt + args.tokens)
        torch.manual_seed(0)
        dense = SpikeDecoder(trained.config.replace(**shape)).eval()
        calibrate(dense, targets, ids, trained.config.n_layer - 1, args.calibrate)
        torch.manual_seed(0)
        ann = SpikeDecoder(SpikeDecoderConfig.from_preset("ann", **{**_shape(trained.config), **shape})).eval()
    return ann, dense, to_events(dense)


def _shape(cfg: SpikeDecoderConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size, max_len=cfg.max_len, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--checkpoint", default="runs/make-run/spikedecoder")
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the random wider models")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check-tokens", type=int, default=200, help="greedy tokens of the trained-model check")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--calibrate", choices=("step", "union"), default="step",
        help="match the trained LIF rates per step (default) or their union over the T steps of a token",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help='print {"rows": [...]} only')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    say = (lambda *a, **k: None) if args.json else print

    if not Path(args.checkpoint).exists():
        sys.exit(f"error: checkpoint {args.checkpoint} not found; run `make run` or pass --checkpoint DIR")
    trained, tokenizer, meta = load_checkpoint(args.checkpoint)
    ann_dir = Path(args.checkpoint).parent / "ann"
    ann_trained = load_checkpoint(ann_dir)[0] if ann_dir.exists() else None
    text = validation_ids(meta, tokenizer)
    prompt = text[: args.prompt][None]
    calib_ids = text[args.prompt : args.prompt + 4 * trained.config.max_len].reshape(4, -1)
    targets = lif_rates(trained, calib_ids, args.calibrate)
    cfg = trained.config
    say(
        f"checkpoint {args.checkpoint}: {cfg.n_layer} layers, width {cfg.n_embd}, T {cfg.timesteps}, "
        f"window {cfg.attn_window}, max_len {cfg.max_len}; ann twin: {ann_dir if ann_trained else 'random'}"
    )
    say(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"prompt {args.prompt}, {args.tokens} new tokens"
    )

    rows, checks = [], {}
    for width in args.widths:
        ann, dense, events = build(width, args, trained, ann_trained, targets, calib_ids)
        models = {"ann": ann, "dense": dense, "events": events}
        if width == cfg.n_embd:
            checks[width] = check_trained(dense, events, prompt, args.check_tokens)
            say(f"\ntrained-model check ({args.check_tokens} greedy tokens via generate()): {checks[width]}")
        else:
            reached = lif_rates(dense, calib_ids, args.calibrate)
            say(f"\nwidth {width}: LIF rates ({args.calibrate}; trained target -> reached):")
            say("  " + ", ".join(f"{n}: {targets[role(n, cfg.n_layer - 1)]:.3f}->{r:.3f}" for n, r in reached.items()))
        for m in models.values():  # warm-up: first calls allocate, compile the fused LIF
            decode(m, prompt, 4)
        counter = RowsRead(events)  # its hooks run tensor ops on every call: an untimed pass of its own
        decode(events, prompt, args.tokens)
        counter.close()
        times = {e: [] for e in ENGINES}
        peak = {e: 0 for e in ENGINES}
        for _ in range(args.rounds):
            for e in ENGINES:
                t, p = decode(models[e], prompt, args.tokens)
                times[e] += t
                peak[e] = max(peak[e], p)
        read = {
            "ann": dense_weight_bytes(ann),
            "dense": dense_weight_bytes(dense),
            "events": event_weight_bytes(events, counter.per_token()),
        }
        say(f"width {width}: event Linear inputs active per step / union over T, while decoding:")
        for n, (per_step, union) in counter.rates().items():
            say(f"    {n.removesuffix('.linear'):<24} {per_step:.3f} / {union:.3f}")
        for e in ENGINES:
            ms = statistics.median(times[e]) * 1e3
            rows.append(
                {
                    "width": width,
                    "engine": e,
                    "n_layer": models[e].config.n_layer,
                    "ms_per_token": round(ms, 3),
                    "tokens_per_s": round(1e3 / ms, 2),
                    "weight_bytes_per_token": read[e],
                    "model_mib": round(tensor_bytes(models[e]) / 2**20, 1),
                    "peak_mib": round((tensor_bytes(models[e]) + peak[e]) / 2**20, 1),
                }
            )
        del ann, dense, events, models
        gc.collect()

    if args.json:
        print(json.dumps({"rows": rows, "checks": checks}))
        return
    print("\n| width | layers | engine | ms/token | tokens/s | weight MiB read/token | model MiB | peak MiB |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['width']} | {r['n_layer']} | {r['engine']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['weight_bytes_per_token'] / 2**20:.2f} | {r['model_mib']:.1f} | {r['peak_mib']:.1f} |"
        )
    print("\n| width | events / ann tokens/s | events / dense tokens/s |")
    print("|---:|---:|---:|")
    for width in args.widths:
        tps = {r["engine"]: r["tokens_per_s"] for r in rows if r["width"] == width}
        print(f"| {width} | {tps['events'] / tps['ann']:.2f} | {tps['events'] / tps['dense']:.2f} |")
    if 1024 in args.widths:
        tps = {r["engine"]: r["tokens_per_s"] for r in rows if r["width"] == 1024}
        a, d = tps["events"] / tps["ann"], tps["events"] / tps["dense"]
        print(
            f"\ntargets at width 1024: events/ann >= 1.0 (aim 2): {a:.2f} {'met' if a >= 1 else 'NOT met'}; "
            f"events/dense >= 3: {d:.2f} {'met' if d >= 3 else 'NOT met'}"
        )
    for width, c in checks.items():
        print(f"trained-model check (width {width}): {'passed' if c['passed'] else 'FAILED'} {c}")


if __name__ == "__main__":
    main()
