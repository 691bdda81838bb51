"""Distillation from a trained teacher, typically the ANN twin: the student learns from the teacher's next-token
distribution beside the text's own next token (Hinton et al. 2015),

    loss = (1 - alpha) * CE(student, text) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))

with alpha = train.distill_weight and tau = train.distill_temperature (tau^2 keeps the soft term's gradient on the
scale of the hard one's as tau grows). The teacher runs in eval mode, without gradients, on the same batch, under
the same autocast. It must read the student's token ids: the same tokenizer (vocabulary) and a context at least as
long. What it costs is recorded with the run (training.json's `distill`, and train()'s result): the teacher's own
training seconds, and the seconds its forward passes added to this training, in all and per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .model import SpikeDecoder
from .rundir import has_checkpoint, load_checkpoint


@dataclass
class Teacher:
    """A loaded teacher and what its use has cost so far (kept across resumes in training.json)."""

    model: SpikeDecoder
    facts: dict[str, Any]
    forward_seconds: float = 0.0
    steps: int = 0
    _start: float = field(default=0.0, repr=False)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """The teacher's logits (float32) for token ids x, timed (a GPU is synchronised around it for the clock)."""
        cuda = x.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        logits = self.model(x).float()
        if cuda:
            torch.cuda.synchronize(x.device)
        self.forward_seconds += time.perf_counter() - start
        self.steps += 1
        return logits

    def record(self, weight: float, temperature: float, train_seconds: float) -> dict[str, Any]:
        """What training.json and the result say about the distillation and its cost."""
        per_step = self.forward_seconds / self.steps if self.steps else 0.0
        return {
            **self.facts,
            "weight": weight,
            "temperature": temperature,
            "teacher_forward_seconds": self.forward_seconds,
            "teacher_forward_steps": self.steps,
            "teacher_forward_seconds_per_step": per_step,
            "teacher_forward_share": self.forward_seconds / train_seconds if train_seconds > 0 else 0.0,
        }


def load_teacher(path: str | Path, tokenizer: Any, max_len: int, device: torch.device, said: str) -> Teacher:
    """The teacher of train.distill from a run or checkpoint directory, checked against the student's tokenizer and
    context; `said` names the setting in messages (e.g. "train.distill='ann' (runs/x/ann)")."""
    path = Path(path)
    if not path.exists() or not (has_checkpoint(path) or (path / "config.json").exists()):
        raise ConfigError(
            f"{said}: no trained run there; give the teacher's run (or checkpoint) directory, trained with "
            "`spikedecoder train`, or in `spikedecoder compare` the name of one of its presets"
        )
    try:
        with torch.random.fork_rng(devices=[]):  # building it draws initial weights: keep the student's stream
            model, teacher_tok, meta = load_checkpoint(path)
    except (CheckpointError, DataError, ValueError) as exc:
        raise ConfigError(f"{said}: the teacher cannot be loaded ({exc})") from exc
    if teacher_tok.to_dict() != tokenizer.to_dict():
        raise ConfigError(
            f"{said}: the teacher's vocabulary ({teacher_tok!r}) is not the student's ({tokenizer!r}); a teacher must "
            "predict the same tokens: train it on the same text with the same train.tokenizer, vocab_size and unk, "
            "or choose another train.distill"
        )
    if model.config.max_len < max_len:
        raise ConfigError(
            f"{said}: the teacher reads at most {model.config.max_len} tokens, the student's windows are "
            f"model.max_len={max_len}: use a teacher trained with max_len >= {max_len}, or a shorter model.max_len"
        )
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    facts = {
        "teacher": str(path.resolve()),
        "teacher_preset": model.config.preset,
        "teacher_params": model.num_params(),
        "teacher_step": int(meta.get("step", 0)),
        "teacher_train_seconds": float(meta.get("train_seconds", 0.0)),
        "teacher_run": meta.get("run"),
    }
    return Teacher(model, facts)


def soft_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), averaged over the token positions."""
    vocab = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, vocab) / temperature, dim=-1)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")
