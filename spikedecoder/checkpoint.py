"""Checkpoints as a directory of safetensors + JSON (never pickle), written atomically.

A checkpoint is written into a fresh temporary directory next to the target, flushed to disk, then swapped in with
renames; a crash or a full disk at any moment leaves either the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or corrupt; the message says what to do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir) then swap tmp_dir into place as `directory`."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(target.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def save_model_files(
    directory: str | Path, config: dict, state: dict[str, Tensor], files: dict[str, str]
) -> Path:
    def write(tmp: Path) -> None:
        write_json(tmp / CONFIG, config)
        save_tensors(tmp / WEIGHTS, state)
        for name, text in files.items():
            (tmp / name).write_text(text)

    return atomic_directory(directory, write)


def resolve(directory: str | Path) -> Path:
    """The checkpoint directory, or the previous one if a crash interrupted the final swap."""
    path = Path(directory)
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            return old
        raise CheckpointError(
            f"no checkpoint at {path}; train one with `spikedecoder train` or check the path"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory with {CONFIG} and {WEIGHTS}")
    return path


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{path} is missing; the checkpoint is incomplete, retrain or restore it"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from exc


def load_tensors(path: Path, map_location: str = "cpu") -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, retrain or restore it")
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is corrupt or not a safetensors file ({exc}); retrain or restore it"
        ) from exc


def load_model_files(directory: str | Path, map_location: str = "cpu") -> tuple[dict, dict[str, Tensor]]:
    path = resolve(directory)
    return read_json(path / CONFIG), load_tensors(path / WEIGHTS, map_location)


def tensors_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
