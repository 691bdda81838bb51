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
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import CheckpointError
from .config import SpikeDecoderConfig
from .data import TokenData, get_batch, load_text, unit_name
from .model import SpikeDecoder
from .optim import TrainingDiverged, grad_norm, learning_rate, lm_loss, param_groups
from .rundir import Logger, data_source, has_checkpoint, rank_key, restore_training_state, rng_state, save_checkpoint
from .runtime import Runtime, evaluate, setup_runtime
from .settings import TrainConfig


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
    data = data or prepare_data(cfg)  # bad data fails before the run directory exists
    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
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
    meta["data_file"] = data_source(cfg.data)
    last_saved: int | None = None
    if resume and has_checkpoint(run_dir):
        start_meta = restore_training_state(run_dir, model, opt, gen, rt.device, rt.rank)
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
        rng = rng_state(rt.device)
        if rt.world > 1:
            states: list[dict[str, Tensor]] = [{} for _ in range(rt.world)]
            dist.all_gather_object(states, {k: v.cpu() for k, v in rng.items()})
            rng = {rank_key(k, r): v for r, state in enumerate(states) for k, v in state.items()}
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
        gnorm = grad_norm(model, cfg.grad_clip).item()
        if not math.isfinite(gnorm):
            bar.close()
            raise TrainingDiverged(
                f"gradient norm became {gnorm} at step {step} (loss {loss_value:.4g}); {kept()}. "
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
