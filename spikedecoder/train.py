"""Training: AdamW with warmup + cosine decay, gradient clipping, evaluation on the whole validation split,
atomic safetensors checkpoints with everything needed to resume exactly (optimizer, step, RNG states).

A run directory holds `checkpoint/` (the latest good state) and `log.csv`. A NaN/inf loss stops training with a
message and leaves the last good checkpoint untouched.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    atomic_directory,
    load_tensors,
    read_json,
    resolve,
    save_tensors,
    write_json,
)
from .config import ConfigError, SpikeDecoderConfig
from .data import TokenData, eval_batches, get_batch, load_text, tokenizer_from_dict, unit_name
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


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: SpikeDecoder, ids: Tensor, unit: str = "char", batch_size: int = 64, max_batches: int | None = None
) -> dict[str, float]:
    """Loss, bits per char (char) or perplexity (tokens), and next-token accuracy over the whole split."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for i, (x, y) in enumerate(eval_batches(ids, model.config.max_len, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(x)
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train(was_training)
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


def save_checkpoint(run_dir: Path, model: SpikeDecoder, tokenizer, meta: dict, opt=None, gen=None) -> Path:
    """Write run_dir/checkpoint atomically: weights, config, tokenizer, training state."""
    tensors, groups = _optimizer_tensors(opt) if opt is not None else ({}, {})
    rng = {"torch": torch.get_rng_state()}
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
    return path / "checkpoint" if (path / "checkpoint").exists() or (path / ".checkpoint.old").exists() else path


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


def validation_ids(meta: dict, tokenizer) -> Tensor:
    """The validation split of the text a checkpoint was trained on (same file, same fractions)."""
    train = meta.get("train", {})
    text = load_text(train.get("data"))
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = len(ids)
    n_val, n_test = int(n * train.get("val_frac", 0.05)), int(n * train.get("test_frac", 0.05))
    return ids[n - n_val - n_test : n - n_test]


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
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def prepare_data(cfg: TrainConfig) -> TokenData:
    return TokenData.from_text(
        load_text(cfg.data),
        tokenizer_kind=cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        unk=cfg.unk,
        val_frac=cfg.val_frac,
        test_frac=cfg.test_frac,
    )


def train(
    model_cfg: SpikeDecoderConfig,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    data: TokenData | None = None,
) -> dict[str, Any]:
    """Train (or resume) a model in run_dir; returns the final validation metrics and run facts."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = data or prepare_data(cfg)
    tokenizer = data.tokenizer
    unit = unit_name(tokenizer)
    model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = SpikeDecoder(model_cfg)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(cfg.seed)
    meta: dict[str, Any] = {"train": dataclasses.asdict(cfg), "step": 0, "history": [], "train_seconds": 0.0}
    if resume and (run_dir / "checkpoint").exists():
        start_meta = _resume(run_dir, model, opt, gen)
        meta.update({k: start_meta[k] for k in ("step", "history", "train_seconds") if k in start_meta})
    step = meta["step"]
    logger = Logger(run_dir, cfg.log)
    model.train()
    start, base_seconds = time.time(), meta["train_seconds"]
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, desc=model_cfg.preset, dynamic_ncols=True)
    last_eval: dict[str, float] = {}

    def checkpoint() -> None:
        meta.update(step=step, train_seconds=base_seconds + time.time() - start, params=model.num_params())
        save_checkpoint(run_dir, model, tokenizer, meta, opt, gen)

    while step < cfg.max_steps:
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(data.train, cfg.batch_size, model_cfg.max_len, gen)
        loss = lm_loss(model(x), y)
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {step}; the last good checkpoint in {run_dir / 'checkpoint'} "
                "is kept. Lower lr, raise warmup_steps or set grad_clip, then resume with --resume."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        logger(step, {"train/loss": loss.item(), "train/lr": lr})
        out_of_time = cfg.max_minutes is not None and (time.time() - start) > 60 * cfg.max_minutes
        if step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time:
            last_eval = evaluate(model, data.val, unit, cfg.eval_batch_size, cfg.eval_batches)
            meta["history"].append({"step": step, **last_eval})
            logger(step, {f"val/{k}": v for k, v in last_eval.items()})
            bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in last_eval.items()))
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or out_of_time:
            checkpoint()
        if out_of_time:
            bar.write(f"stopping after {cfg.max_minutes} minutes at step {step} (checkpoint saved; --resume goes on)")
            break
    bar.close()
    if not last_eval:
        last_eval = evaluate(model, data.val, unit, cfg.eval_batch_size, cfg.eval_batches)
    return {"val": last_eval, "step": step, "params": model.num_params(), "train_seconds": meta["train_seconds"]}


def _resume(run_dir: Path, model: SpikeDecoder, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
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
    torch.set_rng_state(rng["torch"])
    if "batches" in rng:
        gen.set_state(rng["batches"])
    return meta


def read_history(run_dir: str | Path) -> list[dict]:
    """Validation history recorded in a run's checkpoint (for plots and studies)."""
    return json.loads((checkpoint_dir(run_dir) / "training.json").read_text()).get("history", [])
