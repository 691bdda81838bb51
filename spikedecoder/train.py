"""Training: AdamW with warmup + cosine decay, gradient clipping, evaluation on the whole validation split,
atomic safetensors checkpoints with everything needed to resume exactly (optimizer, step, RNG states).

A run directory holds `checkpoint/` (the latest good state) and `log.csv`. A NaN/inf loss (or gradient) stops training
with a message and leaves the last good checkpoint untouched; a failed checkpoint write (disk full) stops it too, with
the previous checkpoint intact. After a crash, even kill -9, `resume=True` continues from the last checkpoint with the
same losses as an uninterrupted run.

Distributed data parallel: launched by torchrun (`torchrun --nproc_per_node=N -m spikedecoder.cli train ...`), every
process trains a replica wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU). One generator, identical on
every rank, draws the global batch of N * batch_size windows and rank r trains on its slice r, so N ranks of batch B
take the same optimisation steps as one process of batch N * B (up to float rounding; BatchNorm statistics are per
rank). Rank 0 writes the checkpoints and the log; evaluation is split over the ranks. On a GPU, the forward pass runs
under bf16 autocast unless precision='fp32'.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    atomic_directory,
    load_tensors,
    previous_path,
    read_json,
    resolve,
    save_tensors,
    write_json,
)
from .config import ConfigError, SpikeDecoderConfig
from .data import (
    TokenData,
    _encode_tensor,
    eval_batches,
    get_batch,
    load_text,
    split_ids,
    tokenizer_from_dict,
    unit_name,
)
from .model import SpikeDecoder


@dataclass
class TrainConfig:
    """How to train: data, optimisation and bookkeeping (the model is a SpikeDecoderConfig)."""

    data: str | None = None  # a UTF-8 text file; None = the built-in Shakespeare corpus
    tokenizer: str = "char"  # char | bpe | word
    vocab_size: int = 1024  # for bpe / word tokenizers
    unk: str | None = None  # map unknown characters to this one instead of failing
    val_frac: float = 0.05
    test_frac: float = 0.05
    batch_size: int = 32
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_batches: int | None = None  # None = the whole validation split
    eval_batch_size: int = 64
    checkpoint_interval: int = 500
    seed: int = 1337
    log: str = "csv"  # csv | tensorboard | none
    max_minutes: float | None = None  # stop (and checkpoint) after this wall time
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when a GPU is visible); torchrun: cuda:LOCAL_RANK
    precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on the CPU) | fp32 | bf16

    def __post_init__(self) -> None:
        checks = [
            (self.tokenizer in ("char", "bpe", "word"), f"tokenizer={self.tokenizer!r}: choose char, bpe or word"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (self.eval_interval >= 1 and self.checkpoint_interval >= 1, "intervals must be >= 1"),
            (self.log in ("csv", "tensorboard", "none"), f"log={self.log!r}: choose csv, tensorboard or none"),
            (
                isinstance(self.device, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device) is not None,
                f"device={self.device!r}: choose cpu, cuda, cuda:N or auto",
            ),
            (self.precision in ("auto", "fp32", "bf16"), f"precision={self.precision!r}: choose auto, fp32 or bf16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------- optimisation
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of Linear layers: never norms, biases, embeddings or thresholds."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or "threshold" in name or ".table." in name or "norm" in name or ".ln." in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------------------------------------- where to run
@dataclass
class Runtime:
    """Where this process trains: its device, its mixed precision, and its place in a torchrun job."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this process initialised the process group (and so ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum of `values` over the ranks (the values themselves in a single process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible to torch; use train.device='cpu'")
    return device


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): join the process group (NCCL on GPU, gloo on
    CPU) and bind each rank to its GPU; a plain process trains alone on cfg.device."""
    device = _pick_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    joined = dist.is_available() and dist.is_initialized()
    rank, owns = 0, False
    if world > 1 or joined:
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; launch one process")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not joined:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    amp = {"bf16": torch.bfloat16, "fp32": None, "auto": torch.bfloat16 if device.type == "cuda" else None}
    return Runtime(device, amp[cfg.precision], rank, world, owns)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: SpikeDecoder,
    ids: Tensor,
    unit: str = "char",
    batch_size: int = 64,
    max_batches: int | None = None,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Loss, bits per char (char) or perplexity (tokens), and next-token accuracy over the whole split.

    With a distributed runtime, rank r takes batches r, r + world, ... and the sums are added over the ranks."""
    rt = runtime or Runtime(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for i, (x, y) in enumerate(eval_batches(ids, model.config.max_len, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        if i % rt.world != rt.rank:
            continue
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits = model(x)
        logits = logits.float()
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
    if rt.world > 1:
        total_loss, correct, count = rt.all_sum([total_loss, correct, count])
        correct, count = int(correct), int(count)
    loss = total_loss / max(count, 1)
    metrics = {"loss": loss, "accuracy": correct / max(count, 1), "tokens": count}
    if unit == "char":
        metrics["bits_per_char"] = loss / math.log(2)
    else:
        metrics["perplexity"] = math.exp(min(loss, 50.0))
    return metrics


# ---------------------------------------------------------------------------------------------- checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    state = opt.state_dict()
    tensors = {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{pid}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: dict) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """This process's global random states (dropout, rate coding)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rank_key(key: str, rank: int) -> str:
    return key if rank == 0 else f"{key}.rank{rank}"


def save_checkpoint(
    run_dir: Path,
    model: SpikeDecoder,
    tokenizer,
    meta: dict,
    opt=None,
    gen=None,
    rng: dict[str, Tensor] | None = None,
) -> Path:
    """Write run_dir/checkpoint atomically: weights, config, tokenizer, training state.

    `rng` holds the random states to keep (default: this process's); the batch generator's is added as "batches"."""
    tensors, groups = _optimizer_tensors(opt) if opt is not None else ({}, {})
    rng = dict(rng) if rng is not None else _rng_state(next(model.parameters()).device)
    if gen is not None:
        rng["batches"] = gen.get_state()

    def write(tmp: Path) -> None:
        write_json(tmp / "config.json", model.config.to_dict())
        save_tensors(tmp / "model.safetensors", model.state_dict())
        write_json(tmp / "tokenizer.json", tokenizer.to_dict())
        write_json(tmp / "training.json", {**meta, **groups})
        if opt is not None:
            save_tensors(tmp / "optimizer.safetensors", tensors)
        save_tensors(tmp / "rng.safetensors", rng)

    return atomic_directory(run_dir / "checkpoint", write)


def checkpoint_dir(path: str | Path) -> Path:
    """Accept a run directory or its checkpoint/ directory."""
    path = Path(path)
    return path / "checkpoint" if has_checkpoint(path) else path


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether run_dir holds a checkpoint (also one whose final swap a crash interrupted)."""
    target = Path(run_dir) / "checkpoint"
    return target.exists() or previous_path(target).exists()


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[SpikeDecoder, Any, dict]:
    """(model in eval mode, tokenizer, training metadata) from a run or checkpoint directory."""
    ckpt = resolve(checkpoint_dir(path))
    model = SpikeDecoder.from_pretrained(ckpt, map_location)
    tok_path = ckpt / "tokenizer.json"
    tokenizer = tokenizer_from_dict(read_json(tok_path)) if tok_path.exists() else None
    if tokenizer is None:
        raise CheckpointError(f"{tok_path} is missing; save models with spikedecoder train to keep the tokenizer")
    meta = read_json(ckpt / "training.json") if (ckpt / "training.json").exists() else {}
    return model, tokenizer, meta


SPLITS = ("train", "val", "test")


def split_ids_for(meta: dict, tokenizer, split: str) -> Tensor:
    """The train, val or test ids of the text a checkpoint was trained on (same file, same fractions)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    train = meta.get("train", {})
    ids = _encode_tensor(tokenizer, load_text(train.get("data")))
    parts = split_ids(ids, train.get("val_frac", 0.05), train.get("test_frac", 0.05))
    return parts[SPLITS.index(split)]


def validation_ids(meta: dict, tokenizer) -> Tensor:
    """The validation split of the text a checkpoint was trained on (same file, same fractions)."""
    return split_ids_for(meta, tokenizer, "val")


# ---------------------------------------------------------------------------------------------- logging
class Logger:
    def __init__(self, run_dir: Path, kind: str):
        self.kind, self.path, self.writer = kind, run_dir / "log.csv", None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("log='tensorboard' needs `pip install tensorboard`; or use log='csv'") from exc
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate(self, step: int) -> None:
        """Forget rows after `step`: a resumed run redoes them (and a fresh run, step 0, starts a new log)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        keep = [rows[0]] + [r for r in rows[1:] if len(r) == 3 and r[0].isdigit() and int(r[0]) <= step]
        if len(keep) == len(rows):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(keep if step > 0 else keep[:1])
        os.replace(tmp, self.path)

    def __call__(self, step: int, values: dict[str, float]) -> None:
        if self.kind == "none":
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(["step", "key", "value"])
            for key, value in values.items():
                w.writerow([step, key, f"{value:.6g}"])


# ---------------------------------------------------------------------------------------------- the loop
class TrainingDiverged(RuntimeError):
    """The loss (or the gradient) became NaN or infinite; the last good checkpoint is kept."""


def prepare_data(cfg: TrainConfig) -> TokenData:
    return TokenData.from_text(
        load_text(cfg.data),
        tokenizer_kind=cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        unk=cfg.unk,
        val_frac=cfg.val_frac,
        test_frac=cfg.test_frac,
    )


def rank_batch(ids: Tensor, batch_size: int, block_size: int, gen: torch.Generator, rt: Runtime):
    """This rank's share of the global batch: every rank draws the same world * batch_size windows from the same
    generator and keeps rows [rank * batch_size, (rank + 1) * batch_size); a single process keeps them all."""
    x, y = get_batch(ids, batch_size * rt.world, block_size, gen)
    if rt.world > 1:
        rows = slice(rt.rank * batch_size, (rt.rank + 1) * batch_size)
        x, y = x[rows], y[rows]
    return x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)


def _grad_norm(model: torch.nn.Module, clip: float) -> Tensor:
    """Total gradient norm, clipped to `clip` when clip > 0 (after DDP's all-reduce: the same on every rank)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def train(
    model_cfg: SpikeDecoderConfig,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    data: TokenData | None = None,
) -> dict[str, Any]:
    """Train (or resume) a model in run_dir; returns the final validation metrics and run facts.

    Under torchrun, every rank calls this with the same arguments (see the module docstring)."""
    rt = setup_runtime(cfg)
    try:
        return _train(model_cfg, cfg, Path(run_dir), resume, progress, data, rt)
    finally:
        if rt.owns_group:
            dist.destroy_process_group()


def _train(
    model_cfg: SpikeDecoderConfig,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    data: TokenData | None,
    rt: Runtime,
) -> dict[str, Any]:
    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    data = data or prepare_data(cfg)
    tokenizer = data.tokenizer
    unit = unit_name(tokenizer)
    model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = SpikeDecoder(model_cfg).to(rt.device)
    if rt.rank:
        torch.manual_seed(cfg.seed + rt.rank)  # own dropout masks and rate-coded spikes on each rank
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU, the same on every rank
    meta: dict[str, Any] = {"train": dataclasses.asdict(cfg), "step": 0, "history": [], "train_seconds": 0.0}
    last_saved: int | None = None
    if resume and has_checkpoint(run_dir):
        start_meta = _resume(run_dir, model, opt, gen, rt)
        meta.update({k: start_meta[k] for k in ("step", "history", "train_seconds") if k in start_meta})
        last_saved = meta["step"]
    step = meta["step"]
    net: torch.nn.Module = model
    if rt.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    logger = Logger(run_dir, cfg.log if rt.main else "none")
    if rt.main:
        logger.truncate(step)
    model.train()
    start, base_seconds = time.time(), meta["train_seconds"]
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (progress and rt.main),
        desc=model_cfg.preset,
        dynamic_ncols=True,
    )
    last_eval: dict[str, float] = {}

    def kept() -> str:
        if last_saved is None:
            return f"no checkpoint was written yet (checkpoint_interval={cfg.checkpoint_interval})"
        return f"the last good checkpoint in {run_dir / 'checkpoint'} (step {last_saved}) is kept"

    def checkpoint() -> None:
        nonlocal last_saved
        meta.update(step=step, train_seconds=base_seconds + time.time() - start, params=model.num_params())
        rng = _rng_state(rt.device)
        if rt.world > 1:
            states: list[dict[str, Tensor]] = [{} for _ in range(rt.world)]
            dist.all_gather_object(states, {k: v.cpu() for k, v in rng.items()})
            rng = {_rank_key(k, r): v for r, state in enumerate(states) for k, v in state.items()}
        error: Exception | None = None
        if rt.main:
            try:
                save_checkpoint(run_dir, model, tokenizer, meta, opt, gen, rng)
            except (OSError, SafetensorError) as exc:
                error = exc
        failed = rt.all_sum([float(error is not None)])[0] > 0  # every rank stops if rank 0 could not write
        if failed:
            bar.close()
            raise CheckpointError(
                f"could not write the checkpoint of step {step} in {run_dir} ({error or 'see rank 0'}); "
                f"{kept()}. Free disk space or fix the directory's permissions, then resume with --resume."
            ) from error
        last_saved = step

    while step < cfg.max_steps:
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = rank_batch(data.train, cfg.batch_size, model_cfg.max_len, gen, rt)
        out_of_time = cfg.max_minutes is not None and (time.time() - start) > 60 * cfg.max_minutes
        with rt.autocast():
            loss = lm_loss(net(x).float(), y)
        if rt.world > 1:  # the mean loss over all ranks, and whether any rank ran out of time
            loss_sum, late = rt.all_sum([loss.item(), float(out_of_time)])
            loss_value, out_of_time = loss_sum / rt.world, late > 0
        else:
            loss_value = loss.item()
        if not math.isfinite(loss_value):
            bar.close()
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step}; {kept()}. "
                "Lower lr, raise warmup_steps or set grad_clip, then resume with --resume."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _grad_norm(model, cfg.grad_clip).item()
        if not math.isfinite(grad_norm):
            bar.close()
            raise TrainingDiverged(
                f"gradient norm became {grad_norm} at step {step} (loss {loss_value:.4g}); {kept()}. "
                "Lower lr or raise warmup_steps, then resume with --resume."
            )
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        logger(step, {"train/loss": loss_value, "train/lr": lr})
        if step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time:
            last_eval = evaluate(model, data.val, unit, cfg.eval_batch_size, cfg.eval_batches, rt)
            meta["history"].append({"step": step, **last_eval})
            logger(step, {f"val/{k}": v for k, v in last_eval.items()})
            if rt.main:
                bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in last_eval.items()))
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or out_of_time:
            checkpoint()
        if out_of_time:
            if rt.main:
                bar.write(
                    f"stopping after {cfg.max_minutes} minutes at step {step} (checkpoint saved; --resume goes on)"
                )
            break
    bar.close()
    if not last_eval:
        last_eval = evaluate(model, data.val, unit, cfg.eval_batch_size, cfg.eval_batches, rt)
    return {
        "val": last_eval,
        "step": step,
        "params": model.num_params(),
        "train_seconds": meta["train_seconds"],
        "rank": rt.rank,  # under torchrun every rank returns the same result; callers report rank 0's
    }


def _resume(
    run_dir: Path, model: SpikeDecoder, opt: torch.optim.Optimizer, gen: torch.Generator, rt: Runtime | None = None
) -> dict:
    rt = rt or Runtime(next(model.parameters()).device)
    ckpt = resolve(run_dir / "checkpoint")
    saved_cfg = read_json(ckpt / "config.json")
    if saved_cfg != model.config.to_dict():
        raise CheckpointError(
            f"{ckpt} was trained with a different model config; use a new --out directory or the same config"
        )
    missing, unexpected = model.load_state_dict(load_tensors(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    meta = read_json(ckpt / "training.json")
    _restore_optimizer(opt, load_tensors(ckpt / "optimizer.safetensors"), meta)
    rng = load_tensors(ckpt / "rng.safetensors")
    # each rank's own random state (a run resumed with another world size reseeds the ranks it has no state for)
    if _rank_key("torch", rt.rank) in rng:
        torch.set_rng_state(rng[_rank_key("torch", rt.rank)])
    if rt.device.type == "cuda" and _rank_key("cuda", rt.rank) in rng:
        torch.cuda.set_rng_state(rng[_rank_key("cuda", rt.rank)], rt.device)
    if "batches" in rng:
        gen.set_state(rng["batches"])
    return meta


def read_history(run_dir: str | Path) -> list[dict]:
    """Validation history recorded in a run's checkpoint (for plots and studies)."""
    return read_json(resolve(checkpoint_dir(run_dir)) / "training.json").get("history", [])
