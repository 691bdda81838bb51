"""What a resumed run must agree with before it goes on: its text, its vocabulary and its training settings.

A run continues only the way it was started, unless told otherwise:
- The text: the run records its file's SHA-256; another text (another file, or the built-in corpus for a file) is
  refused unless `--data-changed ok`. Runs from before hashes were recorded, and the built-in corpus, are compared by
  vocabulary. Either way the run keeps its own tokenizer (the model's ids mean its characters), so a new text must
  use only the run's vocabulary.
- The settings that shape the optimisation (lr, batch_size, warmup_steps, betas, ...): a change is named
  (`train.lr: 0.003 -> 0.001`) and refused unless `--settings-changed ok`. The tokenizer settings never change on
  resume. The budget and the bookkeeping (max_steps, max_minutes, the intervals, evaluation size, log, device,
  precision) may change: a note names them.
- The budget: a run already past max_steps is an error (nothing to train); one exactly at it, a note.
Everything here only reads, so a refused resume leaves the run directory as it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import read_json, resolve
from .config import ConfigError
from .data import CharTokenizer, DataError, TokenData, UnknownCharacterError, load_text, tokenizer_from_dict
from .rundir import data_source
from .settings import TrainConfig

# may change on resume, with a note: how long to train, how often to measure and save, where to run
FREE = ("max_steps", "max_minutes", "checkpoint_interval", "eval_interval", "eval_batches", "eval_batch_size")
FREE += ("log", "device", "precision")
TOKENIZER = ("tokenizer", "vocab_size", "unk")  # the model's vocabulary: never changes on resume
HANDLED = ("data",)  # compared by content (SHA-256), not by path


@dataclass
class Resumed:
    """The checked facts of a resumed run: its data (encoded with the run's tokenizer), notes to print and the
    changes to record in the checkpoint."""

    data: TokenData
    step: int
    notes: list[str] = field(default_factory=list)
    changes: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _changed(saved: dict[str, Any], now: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The training settings that differ, {key: (saved, now)}; a key the saved run lacks had its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    current = dataclasses.asdict(now)
    out = {}
    for key, value in current.items():
        before = saved.get(key, defaults[key])
        if key not in HANDLED and before != value:
            out[key] = (before, value)
    return out


def _tokenizer_changes(saved_tok: dict, changed: dict[str, tuple[Any, Any]]) -> list[str]:
    """The tokenizer settings that would give another vocabulary (vocab_size means nothing to a char tokenizer,
    unk nothing to bpe or word)."""
    kind = saved_tok.get("kind")
    relevant = {"tokenizer"} | ({"unk"} if kind == "char" else {"vocab_size"})
    return [k for k in TOKENIZER if k in changed and k in relevant]


def _describe(source: dict | None) -> str:
    return "the built-in corpus" if source is None else repr(source["path"])


def check_resume(
    run_dir: Path,
    cfg: TrainConfig,
    data: TokenData | None,
    allow_data_change: bool = False,
    allow_settings_change: bool = False,
) -> Resumed:
    """Compare the run's checkpoint with this resume's settings and text (module docstring); raise ConfigError or
    DataError naming what differs and the flag that allows it. `data`: the text prepared by the caller, if any."""
    ckpt = resolve(run_dir / "checkpoint")
    meta = read_json(ckpt / "training.json")
    saved_tok = read_json(ckpt / "tokenizer.json")
    step = int(meta.get("step", 0))
    changed = _changed(meta.get("train", {}), cfg)
    notes: list[str] = []
    changes: dict[str, Any] = {}

    fixed = _tokenizer_changes(saved_tok, changed)
    if fixed:
        named = ", ".join(f"train.{k}: {_value(changed[k][0])} -> {_value(changed[k][1])}" for k in fixed)
        raise ConfigError(
            f"{run_dir} was trained with another tokenizer ({named}); a run's vocabulary cannot change: resume with "
            "its tokenizer settings, or train afresh with --force or another --out"
        )
    guarded = {k: v for k, v in changed.items() if k not in FREE and k not in TOKENIZER}
    named = ", ".join(f"train.{k}: {_value(a)} -> {_value(b)}" for k, (a, b) in guarded.items())
    if guarded and not allow_settings_change:
        raise ConfigError(
            f"{run_dir} was trained with other settings ({named}); resume with the run's settings, pass "
            "--settings-changed ok to go on with these, or train afresh with --force or another --out"
        )
    if guarded:
        notes.append(f"going on with changed settings: {named}")
        changes["settings"] = {k: list(v) for k, v in guarded.items()}
    if step > cfg.max_steps:
        raise ConfigError(
            f"{run_dir} is at step {step}, past max_steps={cfg.max_steps}: nothing to train; give --steps above "
            f"{step} to train on, or measure it with `spikedecoder evaluate {run_dir}`"
        )
    free = {k: v for k, v in changed.items() if k in FREE}
    if free:
        named = ", ".join(f"train.{k}: {_value(a)} -> {_value(b)}" for k, (a, b) in free.items())
        stretch = " (the learning-rate schedule now ends at the new max_steps)" if "max_steps" in free else ""
        notes.append(f"resuming with {named}{stretch}")
    if step == cfg.max_steps:
        notes.append(f"already at step {step} = max_steps: nothing to train (give --steps above {step} to go on)")

    tokenizer = tokenizer_from_dict(saved_tok)
    source, now = meta.get("data_file"), data_source(cfg.data)
    saved_path = meta.get("train", {}).get("data")
    text = None
    if source is not None:
        same = now is not None and now["sha256"] == source["sha256"]
        was = f"{source['path']!r} (sha256 {source['sha256'][:12]}...)"
    elif saved_path is None:
        same, was = now is None, "the built-in corpus"
    else:  # a run from before hashes were recorded: only its vocabulary can be compared
        text = load_text(cfg.data) if now is not None else None
        same = text is not None and (not isinstance(tokenizer, CharTokenizer) or set(text) <= set(tokenizer.chars))
        was = f"{saved_path!r} (no hash recorded)"
    if not same and not allow_data_change:
        given = f"--data {now['path']} (sha256 {now['sha256'][:12]}...)" if now else "the built-in corpus (no --data)"
        path = source["path"] if source else saved_path
        fix = f"--data {path}" if path else "without --data"
        raise DataError(
            f"{run_dir} was trained on {was}; this resume gives {given}, another text: resume on the run's text "
            f"({fix}), or pass --data-changed ok to train on this one"
        )
    if not same:
        notes.append(f"going on with another text: {_describe(now)} instead of {was}")
        changes["data_file"] = [source, now]
    elif source is not None and now is not None and source["path"] != now["path"]:
        notes.append(f"the run's text is now read from {now['path']!r} (same SHA-256 as {source['path']!r})")
    if data is not None and data.tokenizer.to_dict() == saved_tok:
        return Resumed(data, step, notes, changes)
    text = load_text(cfg.data) if text is None else text
    try:
        data = TokenData.from_text(text, val_frac=cfg.val_frac, test_frac=cfg.test_frac, tokenizer=tokenizer)
    except UnknownCharacterError as exc:
        shown = ", ".join(repr(c) for c in exc.chars[:20]) + (" ..." if len(exc.chars) > 20 else "")
        raise DataError(
            f"{_describe(now)} has {len(exc.chars)} character(s) the vocabulary of {run_dir} lacks: {shown}; a run's "
            "vocabulary cannot grow: give a text without them, or train afresh with --force or another --out"
        ) from None
    return Resumed(data, step, notes, changes)
