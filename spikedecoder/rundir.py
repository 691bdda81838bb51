"""A run directory on disk: its checkpoint (weights, config, tokenizer, optimizer and random states, written
atomically), its log, and the splits of the text it was trained on.

Everything that reads a trained run (generation, evaluation, energy, studies, benchmarks) imports this module, never
the training loop. A run directory holds `checkpoint/` (the latest good state) and `log.csv`. While a training
writes it, the directory is locked (lock.py): a second training into it stops at once.

A fresh run started over an old one (--force) writes its log to `.log-RUN.csv` until its first checkpoint has
replaced the old run's; then that log replaces `log.csv`. So the log always belongs to the checkpoint beside it:
a new run interrupted before its first checkpoint leaves the old run exactly as it was, and a crash between the
checkpoint's swap and the log's is completed by the next training in the directory (`settle_logs`: the checkpoint
names its run, RUN).
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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
from .config import ConfigError, SpikeDecoderConfig, with_defaults
from .data import DataError, _encode_tensor, file_sha256, load_text, split_ids, tokenizer_from_dict
from .lock import Locked, exclusive, locked_by_another
from .model import SpikeDecoder


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


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """This process's global random states (dropout, rate coding)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rank_key(key: str, rank: int) -> str:
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
    rng = dict(rng) if rng is not None else rng_state(next(model.parameters()).device)
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
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # training never saves such weights (it stops at a NaN): the file was damaged or written elsewhere
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} holds NaN or infinite weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the checkpoint is damaged: retrain, or restore it from a copy"
        )
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
    ids = _encode_tensor(tokenizer, training_text(meta))
    parts = split_ids(ids, train.get("val_frac", 0.05), train.get("test_frac", 0.05))
    return parts[SPLITS.index(split)]


def data_source(path: str | None) -> dict[str, str] | None:
    """What a run records about its training file: the absolute path and the SHA-256 of its bytes."""
    if path is None:
        return None
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def training_text(meta: dict) -> str:
    """The text a checkpoint was trained on, found from any directory through the recorded absolute path; a file
    that moved or changed since training is an error, since its splits would no longer be the run's. Runs from
    before paths and hashes were recorded (no `data_file`) read the path as it was given."""
    data = meta.get("train", {}).get("data")
    source = meta.get("data_file")
    if data is None:
        return load_text(None)
    other = "; or measure another text with `spikedecoder evaluate RUN --data FILE`"
    if source is None:
        if not Path(data).is_file():
            raise DataError(
                f"this run was trained on {data!r}, a path relative to the directory it was trained in (it predates "
                f"recorded absolute paths): run from that directory{other}"
            )
        return load_text(data)
    path = Path(source["path"])
    if not path.is_file():
        raise DataError(f"the run's training text {str(path)!r} has moved or been deleted: put it back{other}")
    digest = file_sha256(path)
    if digest != source["sha256"]:
        raise DataError(
            f"the run's training text {str(path)!r} changed since training (sha256 {source['sha256'][:12]}... then, "
            f"{digest[:12]}... now), so its splits are not the ones the model was validated on: restore it{other}"
        )
    return load_text(path)


def validation_ids(meta: dict, tokenizer) -> Tensor:
    """The validation split of the text a checkpoint was trained on (same file, same fractions)."""
    return split_ids_for(meta, tokenizer, "val")


def config_diff(saved: dict, now: dict, limit: int = 4) -> str:
    """The model settings that differ between a saved config and this model's, as `key: saved -> now`."""
    keys = sorted(k for k in saved.keys() | now.keys() if saved.get(k, "absent") != now.get(k, "absent"))
    parts = [f"{k}: {saved.get(k, 'absent')!r} -> {now.get(k, 'absent')!r}" for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def restore_training_state(
    run_dir: Path,
    model: SpikeDecoder,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    device: torch.device | None = None,
    rank: int = 0,
) -> dict:
    """Load weights, optimizer, this rank's random states and the batch generator's from run_dir's checkpoint;
    returns the training metadata."""
    device = device or next(model.parameters()).device
    ckpt = resolve(run_dir / "checkpoint")
    saved_cfg = with_defaults(SpikeDecoderConfig, read_json(ckpt / "config.json"))  # fields added since: defaults
    model_cfg = model.config.to_dict()
    if saved_cfg != model_cfg:
        raise CheckpointError(
            f"{ckpt} was trained with a different model config ({config_diff(saved_cfg, model_cfg)}); "
            "resume with the config it was trained with, or train afresh with --force or a new --out "
            "(`make run` resumes runs/make-run: move that folder away to start anew)"
        )
    missing, unexpected = model.load_state_dict(load_tensors(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    meta = read_json(ckpt / "training.json")
    _restore_optimizer(opt, load_tensors(ckpt / "optimizer.safetensors"), meta)
    rng = load_tensors(ckpt / "rng.safetensors")
    # each rank's own random state (a run resumed with another world size reseeds the ranks it has no state for)
    if rank_key("torch", rank) in rng:
        torch.set_rng_state(rng[rank_key("torch", rank)])
    if device.type == "cuda" and rank_key("cuda", rank) in rng:
        torch.cuda.set_rng_state(rng[rank_key("cuda", rank)], device)
    if "batches" in rng:
        gen.set_state(rng["batches"])
    return meta


def read_history(run_dir: str | Path) -> list[dict]:
    """Validation history recorded in a run's checkpoint (for plots and studies)."""
    return read_json(resolve(checkpoint_dir(run_dir)) / "training.json").get("history", [])


# ---------------------------------------------------------------------------------------------- output safety
def holds_run(run_dir: str | Path) -> bool:
    """Whether run_dir already holds a run's work: a checkpoint, or a log of steps."""
    return has_checkpoint(run_dir) or (Path(run_dir) / "log.csv").exists()


def check_writable(path: str | Path, what: str = "--out") -> None:
    """Fail now, before any work, if `path` (a directory, made later if missing) could not be written: the nearest
    existing folder must be a directory where a file can really be created (permissions, read-only mounts)."""
    path = Path(path)
    folder = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not folder.is_dir():
        raise ConfigError(f"{what} {path}: {folder} is a file, not a directory; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{what} {path}: cannot write in {folder} ({exc.strerror}); choose a writable directory"
        ) from exc


def check_run_dirs(run_dirs: list[Path], resume: bool, force: bool) -> list[bool]:
    """Never overwrite a run unasked: a directory that holds a run needs resume (continue it) or force (train anew;
    its checkpoint and log stay until the new run writes its first checkpoint). resume where no directory holds a
    run is an error; a run that stopped before its first checkpoint (a log, no checkpoint) starts again from step 0.
    Returns, per directory, whether to resume it from its checkpoint."""
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: --resume continues a run, --force replaces it")
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 checks (the others could see its new files)
        return [resume and has_checkpoint(d) for d in run_dirs]
    if resume and not any(holds_run(d) for d in run_dirs):
        where = " or ".join(str(d) for d in run_dirs)
        raise ConfigError(f"--resume: nothing to resume, {where} holds no checkpoint; leave out --resume to start")
    taken = [str(d) for d in run_dirs if holds_run(d)]
    if taken and not (resume or force):
        raise ConfigError(
            f"{', '.join(taken)} already holds a run; add --resume to continue it, --force to replace it, "
            "or choose another --out"
        )
    for d in run_dirs:
        check_writable(d)
        if resume and holds_run(d) and not has_checkpoint(d):
            said = "holds no checkpoint (its run stopped before the first one): starting it from step 0"
            print(f"note: {d} {said}", file=sys.stderr)
    return [resume and has_checkpoint(d) for d in run_dirs]


@contextlib.contextmanager
def claim_run_dirs(run_dirs: list[Path], resume: bool, force: bool) -> Iterator[list[bool]]:
    """check_run_dirs while holding every directory's lock (made if missing), for the whole block: two commands
    writing one run directory at once cannot both pass the check. Yields check_run_dirs' answer."""
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 holds the locks
        yield check_run_dirs(run_dirs, resume, force)
        return
    if resume and force:
        check_run_dirs(run_dirs, resume, force)  # the contradiction, before anything is made
    with contextlib.ExitStack() as stack:
        for d in run_dirs:
            stack.enter_context(lock_run_dir(d))
        yield check_run_dirs(run_dirs, resume, force)


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Make run_dir if missing and hold its lock for the block (re-entrant in one process); a directory another
    process holds is a ConfigError. On an error, the folders made here and left empty are removed again."""
    run_dir = Path(run_dir)
    check_writable(run_dir)
    with removed_if_left_empty(run_dir), contextlib.ExitStack() as stack:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            stack.enter_context(exclusive(run_dir))
        except Locked:
            raise ConfigError(
                f"{run_dir} is being written by another training right now (it holds the run directory's lock); "
                "wait for it to end, or choose another --out"
            ) from None
        yield


@contextlib.contextmanager
def removed_if_left_empty(path: str | Path) -> Iterator[None]:
    """On an error, remove the folders of `path` that did not exist before and are still empty: a failed command
    leaves no empty output folders behind (and never touches what was there, nor a folder another process has
    locked since)."""
    path = Path(path).absolute()
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in created:
            if locked_by_another(folder):
                break
            try:
                folder.rmdir()
            except FileNotFoundError:  # never made
                continue
            except OSError:  # not empty: keep it and everything above
                break
        raise


# ---------------------------------------------------------------------------------------------- logging
def pending_log(run_dir: Path, run: str) -> Path:
    """Where a fresh run over an old one logs until its first checkpoint (module docstring)."""
    return run_dir / f".log-{run}.csv"


def settle_logs(run_dir: Path) -> None:
    """Finish what a crash interrupted: the pending log of the run whose checkpoint is in run_dir becomes log.csv;
    the pending logs of runs that never wrote a checkpoint are removed."""
    run = None
    if has_checkpoint(run_dir):
        with contextlib.suppress(CheckpointError):
            run = read_json(resolve(run_dir / "checkpoint") / "training.json").get("run")
    for path in run_dir.glob(".log-*.csv"):
        if run is not None and path == pending_log(run_dir, run):
            os.replace(path, run_dir / "log.csv")
        else:
            path.unlink(missing_ok=True)


class Logger:
    """Training curves in log.csv (step, key, value), and in TensorBoard if asked. `pending`: the run id of a fresh
    run over an old one, which logs to its pending log until `adopt` (after its first checkpoint)."""

    def __init__(self, run_dir: Path, kind: str, pending: str | None = None):
        self.kind, self.final, self.writer = kind, run_dir / "log.csv", None
        self.path = pending_log(run_dir, pending) if pending else self.final
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("log='tensorboard' needs `pip install tensorboard`; or use log='csv'") from exc
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def adopt(self) -> None:
        """The run's checkpoint is on disk: its log becomes log.csv (once; later calls do nothing). A run that logs
        nothing (log='none') removes the old run's log instead, which no longer belongs to the checkpoint."""
        if self.path != self.final:
            if self.path.exists():
                os.replace(self.path, self.final)
            else:
                self.final.unlink(missing_ok=True)
            self.path = self.final

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
