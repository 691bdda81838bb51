"""Compiling the event kernel (kernels/events.cpp) on first use, so that no later run can hang or crash on it.

- The cached build is keyed by the CPU features it is compiled for. `-march=native` lets the compiler use every
  instruction-set extension of this CPU (AVX-512, ...), so the key is the set of ISA macros that -march=native defines
  beyond the compiler's defaults (and Python's and torch's versions). A home directory shared by machines with other
  CPUs holds one build per feature set, and a machine never loads one compiled for instructions it lacks (SIGILL).
  Where the compiler has no -march=native, the build is portable and keyed `generic`.
- One build at a time per build folder, under an OS lock (lock.py) that the kernel releases when a builder dies.
  torch's own build lock is a plain file, which a build killed midway (out of memory, kill -9, a job timeout) leaves
  behind, and torch then waits for it to go away forever. Under our lock no build of ours is alive to hold it, so a
  leftover one is stale: it is removed, with a warning. A build that another process keeps going for longer than
  BUILD_WAIT seconds is not waited for: the engine falls back this time.
- ninja (a declared dependency) is found on PATH or in the `ninja` package; without it, or without a C++ compiler, the
  engine falls back, with one warning that names the fix.
Every failure returns None: the caller (events.py) then uses embedding_bag, the same floats, slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from .lock import Locked, exclusive

BUILD_WAIT = 300.0  # seconds to wait for another process's build of the same kernel
FALLBACK = "using embedding_bag (the same floats, slower)"


def _warn(message: str) -> None:
    warnings.warn(f"event kernel: {message}; {FALLBACK}", stacklevel=3)


def compiler() -> str:
    """The C++ compiler torch's extension builder uses."""
    return os.environ.get("CXX", "c++")


def _macros(flags: list[str]) -> set[str] | None:
    try:
        out = subprocess.run(
            [compiler(), *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


def native_features() -> list[str] | None:
    """The macros -march=native adds to the compiler's defaults (`#define __AVX2__ 1`, ...), or None where the
    compiler has no -march=native."""
    base, native = _macros([]), _macros(["-march=native"])
    if base is None or native is None:
        return None
    return sorted(native - base)


def build_directory(name: str, features: list[str] | None) -> Path:
    """Where the kernel compiled for `features` is cached: under TORCH_EXTENSIONS_DIR (or torch's default root), one
    folder per Python and torch version, one per feature set."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    version = (
        f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_torch{torch.__version__}"
    )
    key = "generic" if features is None else hashlib.sha256("\n".join(features).encode()).hexdigest()[:16]
    return Path(root) / version / f"{name}-{key}"


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[bool]:
    """ninja on PATH for the build (the `ninja` package's copy when PATH has none); False if there is none."""
    if shutil.which("ninja"):
        yield True
        return
    try:
        import ninja
    except ImportError:
        yield False
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if not bin_dir or not (Path(bin_dir) / "ninja").exists():
        yield False
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        yield True
    finally:
        os.environ["PATH"] = path


def load_kernel(name: str, source: Path, cflags: list[str], wait: float = BUILD_WAIT) -> ModuleType | None:
    """Build (or find built) and import the extension `name` from `source` (module docstring), or None with one
    warning. `cflags` must not hold -march: it is added here, where the compiler supports it."""
    if shutil.which(compiler()) is None:
        _warn(f"no C++ compiler ({compiler()!r}) to build it; install g++ or clang, or set CXX")
        return None
    features = native_features()
    flags = [*cflags, "-march=native"] if features is not None else list(cflags)
    build_dir = build_directory(name, features)
    with _ninja_on_path() as have_ninja:
        if not have_ninja:
            _warn("ninja, which builds it, is missing; `pip install ninja` (a dependency of spikedecoder)")
            return None
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            if features is not None and not (build_dir / "cpu-features.txt").exists():
                (build_dir / "cpu-features.txt").write_text("compiled with -march=native for:\n" + "\n".join(features))
            with exclusive(build_dir / "build.lock", wait=wait):
                stale = build_dir / "lock"  # torch's: no build of ours is alive to hold it
                if stale.exists():
                    warnings.warn(
                        f"event kernel: removing the stale build lock {stale} left by a build that was killed",
                        stacklevel=2,
                    )
                    stale.unlink(missing_ok=True)
                from torch.utils.cpp_extension import load

                return load(name, [str(source)], extra_cflags=flags, build_directory=str(build_dir))
        except Locked:
            _warn(f"another process has been building it in {build_dir} for over {wait:.0f} s")
        except Exception as error:  # noqa: BLE001 - any build failure means the fallback, said once
            _warn(f"not built ({type(error).__name__}: {error})")
    return None
