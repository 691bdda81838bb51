"""The training loop: AdamW with warmup + cosine decay (optim.py), gradient clipping, evaluation on the whole
validation split (runtime.py), atomic checkpoints with everything needed to resume exactly (rundir.py).

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

Levers on the loss, each off by default: a firing-rate regulariser (`rate_weight`, `rate_target`; rates.py) and
distillation from a trained teacher (`distill`, `distill_weight`, `distill_temperature`; distill.py). The firing rates
of the LIF layers on the validation split are logged at every evaluation (val/firing_rate, rate/LAYER), whatever
the settings; the regulariser's hooks exist only while it is on, so the plain training step is unchanged.

A resumed run is checked against its checkpoint first (resume.py): the same text and the same optimisation
settings unless allowed. Nothing is written before the checks pass, and the run directory is locked while a
training writes it (rundir.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import CheckpointError
from .config import ConfigError, SpikeDecoderConfig
from .data import DataError, TokenData, get_batch, load_text, unit_name
from .distill import load_teacher, soft_loss
from .model import SpikeDecoder
from .optim import TrainingDiverged, grad_norm, learning_rate, lm_loss, param_groups
from .rates import FiringRates, layer_targets, rate_penalty, summarise
from .resume import check_resume
from .rundir import (
    Logger,
    data_source,
    has_checkpoint,
    lock_run_dir,
    rank_key,
    restore_training_state,
    rng_state,
    save_checkpoint,
    settle_logs,
)
from .runtime import Runtime, evaluate, setup_runtime
from .settings import TrainConfig


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what is kept and which command goes on."""


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


def train(
    model_cfg: SpikeDecoderConfig,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    data: TokenData | None = None,
    allow_data_change: bool = False,
    allow_settings_change: bool = False,
    teacher_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or resume) a model in run_dir; returns the final validation metrics and run facts.

    resume: continue from run_dir's checkpoint, which must agree with `cfg` and the text (resume.py) unless
    allow_data_change / allow_settings_change. teacher_dir: where the teacher `cfg.distill` names lies (compare
    passes OUT/PRESET for a preset's name; default: cfg.distill itself, a directory). Under torchrun, every rank
    calls this with the same arguments (see the module docstring)."""
    rt = setup_runtime(cfg)
    try:
        with lock_run_dir(run_dir) if rt.main else contextlib.nullcontext():
            return _train(model_cfg, cfg, Path(run_dir), resume, progress, data, rt, allow_data_change,
                          allow_settings_change, teacher_dir)  # fmt: skip
    finally:
        if rt.owns_group:
            dist.destroy_process_group()


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory errors: CUDA's, and the CPU allocator's RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def check_fits(model_cfg: SpikeDecoderConfig, cfg: TrainConfig, data: TokenData, rt: Runtime) -> None:
    """Refuse, before any allocation, a batch whose activations surely exceed the memory there is. A lower bound
    (the real need is several times larger): at every timestep each layer keeps its input and its MLP's hidden
    activation for the backward pass, one value per channel (evaluation: one layer at a time), and the logits one
    value per vocabulary entry. (On Linux a larger allocation than fits is often granted and then the process is
    killed, with no error to report: so the check comes first.)"""
    if rt.device.type == "cuda":
        total = torch.cuda.get_device_properties(rt.device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
    size = 4 if cfg.precision == "fp32" or (cfg.precision == "auto" and rt.device.type == "cpu") else 2  # bf16
    layer = model_cfg.timesteps * (model_cfg.mlp_ratio + 1) * model_cfg.n_embd
    windows = len(data.val) // model_cfg.max_len + 1  # evaluation batches hold at most the split's windows
    for key, batch, per_token in (
        ("batch_size", cfg.batch_size, model_cfg.n_layer * layer + data.vocab_size),
        ("eval_batch_size", min(cfg.eval_batch_size, windows), layer + data.vocab_size),
    ):
        need = size * batch * model_cfg.max_len * per_token
        if need > total:
            raise ConfigError(
                f"train.{key}={getattr(cfg, key)} with model.max_len={model_cfg.max_len} needs at least "
                f"{need / 2**30:,.0f} GiB for one step's activations, more than the {total / 2**30:,.0f} GiB of memory "
                f"on {rt.device}: lower it (--set train.{key}=...)"
            )


def _train(
    model_cfg: SpikeDecoderConfig,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    data: TokenData | None,
    rt: Runtime,
    allow_data_change: bool = False,
    allow_settings_change: bool = False,
    teacher_dir: str | Path | None = None,
) -> dict[str, Any]:
    resumed = None
    if resume and has_checkpoint(run_dir):  # checked before anything is written
        resumed = check_resume(run_dir, cfg, data, allow_data_change, allow_settings_change)
        data = resumed.data
    data = data or prepare_data(cfg)  # bad data fails before anything is written
    tokenizer = data.tokenizer
    unit = unit_name(tokenizer)
    model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
    if len(data.train) < model_cfg.max_len + 1:
        raise DataError(
            f"the training split has {len(data.train)} tokens but one training window needs model.max_len + 1 = "
            f"{model_cfg.max_len + 1}: use a longer text (--data) or a shorter context (--set model.max_len=...)"
        )
    check_fits(model_cfg, cfg, data, rt)
    replacing = resumed is None and has_checkpoint(run_dir)  # a fresh run over an old one (--force)
    torch.manual_seed(cfg.seed)
    model = SpikeDecoder(model_cfg).to(rt.device)
    # the levers, checked before anything is written: the regulariser's layers, the teacher
    regularised = FiringRates(model, keep_graph=True) if cfg.rate_weight > 0 else None
    targets = layer_targets(list(regularised.lifs), cfg.rate_target) if regularised else {}
    if regularised is not None and not targets:
        regularised = None  # a model without LIF layers (the ANN): nothing to regularise
    teacher = None
    if cfg.distill is not None:
        where = Path(teacher_dir) if teacher_dir is not None else Path(cfg.distill)
        said = f"train.distill={cfg.distill!r}" + (f" ({where})" if teacher_dir is not None else "")
        if where.resolve() in (run_dir.resolve(), (run_dir / "checkpoint").resolve()):
            raise ConfigError(f"{said} is this run itself; give another run, trained before, as the teacher")
        teacher = load_teacher(where, tokenizer, model_cfg.max_len, rt.device, said)
    if rt.main:
        settle_logs(run_dir)
        for note in resumed.notes if resumed else []:
            print(f"note: {run_dir}: {note}", file=sys.stderr)
    if rt.rank:
        torch.manual_seed(cfg.seed + rt.rank)  # own dropout masks and rate-coded spikes on each rank
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU, the same on every rank
    meta: dict[str, Any] = {"train": dataclasses.asdict(cfg), "step": 0, "history": [], "train_seconds": 0.0}
    meta["data_file"] = data_source(cfg.data)
    meta["run"] = uuid.uuid4().hex[:12]  # names the run's pending log (rundir.py)
    last_saved: int | None = None
    if resumed is not None:
        start_meta = restore_training_state(run_dir, model, opt, gen, rt.device, rt.rank)
        meta.update({k: start_meta[k] for k in ("step", "history", "train_seconds", "run") if k in start_meta})
        spent = start_meta.get("distill", {})
        if teacher is not None:  # the teacher's forward time so far, kept across resumes
            teacher.forward_seconds = spent.get("teacher_forward_seconds", 0.0)
            teacher.steps = spent.get("teacher_forward_steps", 0)
            if spent.get("teacher_run") not in (None, teacher.facts["teacher_run"]) and rt.main:
                print(
                    f"note: {run_dir}: the teacher {teacher.facts['teacher']} is another run than before",
                    file=sys.stderr,
                )
        changes = list(start_meta.get("changes", []))  # what resumes changed, kept with the run
        changes += [{"step": start_meta["step"], **resumed.changes}] if resumed.changes else []
        if changes:
            meta["changes"] = changes
        last_saved = meta["step"]
    step = meta["step"]
    net: torch.nn.Module = model
    if rt.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    logger = Logger(run_dir, cfg.log if rt.main else "none", pending=meta["run"] if replacing else None)
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
        if last_saved is not None:
            return f"the last good checkpoint in {run_dir / 'checkpoint'} (step {last_saved}) is kept"
        said = f"no checkpoint was written yet (checkpoint_interval={cfg.checkpoint_interval})"
        return said + (f"; {run_dir} still holds the previous run, unchanged" if replacing else "")

    def again(changed: bool = False) -> str:
        """The command that goes on from what is kept (`changed`: after changing a training setting)."""
        if last_saved is not None:
            return "resume with --resume" + (" --settings-changed ok" if changed else "")
        if replacing:
            return "start the new run again with --force (--resume would continue the previous one)"
        return "start again with --force (nothing was saved: it replaces only the log)"

    def checkpoint() -> None:
        nonlocal last_saved
        meta.update(step=step, train_seconds=base_seconds + time.time() - start, params=model.num_params())
        if teacher is not None:
            meta["distill"] = teacher.record(cfg.distill_weight, cfg.distill_temperature, meta["train_seconds"])
        rng = rng_state(rt.device)
        if rt.world > 1:
            states: list[dict[str, Tensor]] = [{} for _ in range(rt.world)]
            dist.all_gather_object(states, {k: v.cpu() for k, v in rng.items()})
            rng = {rank_key(k, r): v for r, state in enumerate(states) for k, v in state.items()}
        error: Exception | None = None
        if rt.main:
            try:
                save_checkpoint(run_dir, model, tokenizer, meta, opt, gen, rng)
                logger.adopt()  # a fresh run's log replaces the old run's once its checkpoint has
            except (OSError, SafetensorError) as exc:
                error = exc
        failed = rt.all_sum([float(error is not None)])[0] > 0  # every rank stops if rank 0 could not write
        if failed:
            raise CheckpointError(
                f"could not write the checkpoint of step {step} in {run_dir} ({error or 'see rank 0'}); "
                f"{kept()}. Free disk space or fix the directory's permissions, then {again()}."
            ) from error
        last_saved = step

    try:
        while step < cfg.max_steps:
            lr = learning_rate(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = rank_batch(data.train, cfg.batch_size, model_cfg.max_len, gen, rt)
            out_of_time = cfg.max_minutes is not None and (time.time() - start) > 60 * cfg.max_minutes
            parts: dict[str, Tensor | float] = {}  # the loss's terms, logged beside it when it has several
            with rt.autocast(), regularised or contextlib.nullcontext():
                logits = net(x).float()
                loss = lm_loss(logits, y)
                if teacher is not None:
                    soft = soft_loss(logits, teacher(x), cfg.distill_temperature)
                    parts.update(ce=loss.detach(), soft=soft.detach())
                    loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * soft
            if regularised is not None:
                penalty, rates = rate_penalty(*regularised.take(), targets, rt.world)
                loss = loss + cfg.rate_weight * penalty
                parts.update(rate_penalty=penalty.detach(), firing_rate=rates["firing_rate"])
            # the means over all ranks (the rates are the global batch's already), and whether any ran out of time
            values = rt.all_sum([loss.item(), *(float(v) for v in parts.values()), float(out_of_time)])
            loss_value, out_of_time = values[0] / rt.world, values[-1] > 0
            parts = {k: v / rt.world for k, v in zip(parts, values[1:-1], strict=True)}
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; {kept()}. "
                    f"Lower lr, raise warmup_steps or set grad_clip, then {again(changed=True)}."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = grad_norm(model, cfg.grad_clip).item()
            if not math.isfinite(gnorm):
                raise TrainingDiverged(
                    f"gradient norm became {gnorm} at step {step} (loss {loss_value:.4g}); {kept()}. "
                    f"Lower lr or raise warmup_steps, then {again(changed=True)}."
                )
            opt.step()
            step += 1
            bar.update(1)
            rate = {"rate": f"{parts['firing_rate']:.3f}"} if "firing_rate" in parts else {}
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", **rate)
            logger(step, {"train/loss": loss_value, "train/lr": lr, **{f"train/{k}": v for k, v in parts.items()}})
            if step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time:
                last_eval, rates = evaluate_with_rates(model, data.val, unit, cfg, rt)
                mean = {"firing_rate": rates.pop("firing_rate")} if rates else {}
                meta["history"].append({"step": step, **last_eval, **mean})
                logger(step, {f"val/{k}": v for k, v in {**last_eval, **mean}.items()})
                logger(step, {f"rate/{k}": v for k, v in rates.items()})  # per LIF layer
                if rt.main:
                    said = {**last_eval, **mean}
                    bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in said.items()))
            if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or out_of_time:
                checkpoint()
            if out_of_time:
                if rt.main:
                    bar.write(
                        f"stopping after {cfg.max_minutes} minutes at step {step} (checkpoint saved; --resume goes on)"
                    )
                break
        if not last_eval:
            last_eval = evaluate(model, data.val, unit, cfg.eval_batch_size, cfg.eval_batches, rt)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted at step {step}; {kept()}: {again()}") from None
    except (RuntimeError, MemoryError) as exc:
        if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
            raise
        raise ConfigError(
            f"out of memory at step {step} (train.batch_size={cfg.batch_size}, model.max_len={model_cfg.max_len}, "
            f"on {rt.device}); {kept()}: lower --set train.batch_size (or the model's size), then {again(True)}"
        ) from None
    finally:
        bar.close()  # ends the bar's line, so that a message after it starts on its own
    result = {
        "val": last_eval,
        "step": step,
        "params": model.num_params(),
        "train_seconds": meta["train_seconds"],
        "rank": rt.rank,  # under torchrun every rank returns the same result; callers report rank 0's
    }
    rates = next((h for h in reversed(meta["history"]) if "firing_rate" in h), None)
    if rates is not None:
        result["firing_rate"] = rates["firing_rate"]
    if teacher is not None:
        result["distill"] = teacher.record(cfg.distill_weight, cfg.distill_temperature, meta["train_seconds"])
    return result


def evaluate_with_rates(
    model: SpikeDecoder, ids: Tensor, unit: str, cfg: TrainConfig, rt: Runtime
) -> tuple[dict[str, float], dict[str, float]]:
    """evaluate() on the validation split, and the firing rates of the model's LIF layers on it (rates.py): their
    mean over every neuron, `firing_rate`, then each layer's; none for a model without LIF layers."""
    with FiringRates(model) as meter:
        metrics = evaluate(model, ids, unit, cfg.eval_batch_size, cfg.eval_batches, rt)
    spikes, updates = meter.take()
    names = list(meter.lifs)  # every rank sums every layer, also one that evaluated no batch
    if not names:
        return metrics, {}
    totals = rt.all_sum([float(spikes.get(n, 0.0)) for n in names] + [float(updates.get(n, 0)) for n in names])
    counts = dict(zip(names, totals[len(names) :], strict=True))
    return metrics, summarise(dict(zip(names, totals[: len(names)], strict=True)), counts)
