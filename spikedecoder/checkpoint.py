"""Checkpoints as a directory of safetensors + JSON (never pickle), written atomically.

A checkpoint is written into a fresh temporary directory next to the target, flushed to disk, then swapped in with
renames; a crash (kill -9, power loss) or a full disk at any moment leaves either the old checkpoint or the new one,
never a mix:

    write .NAME.tmp-XXXX/ and fsync it -> NAME -> .NAME.old -> .NAME.tmp-XXXX -> NAME -> delete .NAME.old

A crash between the two renames leaves only .NAME.old, which `resolve` reads and the next write puts back first;
a crash while writing leaves a stale temporary, never read, and removed by the next write. One writer per directory.
"""

from __future__ import annotations

import glob
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


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root (the directories hold the new names)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(folder))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def previous_path(directory: str | Path) -> Path:
    """Where the previous version of a checkpoint waits while the new one is swapped in."""
    path = Path(directory)
    return path.with_name(f".{path.name}.old")


def atomic_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir) then swap tmp_dir into place as `directory`; errors propagate unchanged, and leave the
    previous `directory` (if any) exactly as it was."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = previous_path(target)
    if old.exists() and not target.exists():
        # an earlier write died between its two renames: its .old is the only complete copy, so put it back
        # before anything below could delete it
        old.rename(target)
    prefix = f".{target.name}.tmp-"
    for stale in target.parent.glob(glob.escape(prefix) + "*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's private 0o700 -> what a plain mkdir would give
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():  # a leftover of an interrupted clean-up; `target` is complete
        shutil.rmtree(old)
    moved = False
    try:
        if target.exists():
            target.rename(old)
            moved = True
        tmp.rename(target)
    except BaseException:
        if moved and not target.exists():
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def save_model_files(directory: str | Path, config: dict, state: dict[str, Tensor], files: dict[str, str]) -> Path:
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
        old = previous_path(path)
        if old.exists():
            return old
        raise CheckpointError(f"no checkpoint at {path}; train one with `spikedecoder train` or check the path")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory with {CONFIG} and {WEIGHTS}")
    return path


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, retrain or restore it") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; the checkpoint is corrupt")
    return data


def load_tensors(path: Path, map_location: str = "cpu") -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, retrain or restore it")
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc}); retrain or restore it") from exc


def load_model_files(directory: str | Path, map_location: str = "cpu") -> tuple[dict, dict[str, Tensor]]:
    path = resolve(directory)
    return read_json(path / CONFIG), load_tensors(path / WEIGHTS, map_location)


def tensors_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
