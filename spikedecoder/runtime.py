"""Where a process trains and evaluates: its device, its mixed precision, its place in a torchrun job, and the
evaluation over a whole split (split over the ranks)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .config import ConfigError
from .data import eval_batches
from .model import SpikeDecoder

if TYPE_CHECKING:
    from .settings import TrainConfig


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
    if cfg.precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(
            "train.precision = 'bf16' on a CPU without native bf16 matmuls (AVX512-BF16 or AMX): autocast emulates "
            "them and trains slower than fp32; set train.precision = 'fp32' (or 'auto') on this machine",
            stacklevel=2,
        )
    return Runtime(device, amp[cfg.precision], rank, world, owns)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's test): there bf16 autocast about halves the spiking
    model's training step (make run), elsewhere it is emulated and slower than fp32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: SpikeDecoder,
    ids: Tensor,
    unit: str = "char",
    batch_size: int = 64,
    max_batches: int | None = None,
    runtime: Runtime | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Loss, bits per char (char) or perplexity (tokens), and next-token accuracy over the whole split.

    With a distributed runtime, rank r takes batches r, r + world, ... and the sums are added over the ranks.
    progress: a bar on stderr once the evaluation has run for a second (so short ones print nothing)."""
    rt = runtime or Runtime(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    block = model.config.max_len
    full = max(len(ids) - 1, 0) // block
    n_batches = -(-full // batch_size) + int(full * block < len(ids) - 1)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    batches = eval_batches(ids, block, batch_size)
    bar = tqdm(batches, total=n_batches, disable=not progress, delay=1.0, leave=False, desc="evaluate", unit="batch")
    try:
        for i, (x, y) in enumerate(bar):
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
    finally:
        bar.close()  # clears the bar's line, also when an error follows
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
