"""Settings from a TOML config file and the command line, merged by one rule, with every value type-checked.

Precedence, highest first (the same for `train`, `compare`, `info` and `study`):
    1. the command line: --set SECTION.KEY=VALUE (and --steps, --data, --minutes for the training keys);
       --set presets.NAME.KEY=VALUE beats --set model.KEY=VALUE for preset NAME
    2. the config file's [presets.NAME] section (and, in a study, the variant's own model/train tables)
    3. the config file's shared [model] and [train] sections
    4. the preset's defaults (SpikeDecoderConfig.from_preset) and TrainConfig's
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PRESETS, ConfigError, SpikeDecoderConfig, reject_unknown

COMMAND_LINE = "_command_line"  # where load_config_file keeps the --set values, apart from the file's
SECTIONS = ("compare", "model", "presets", "study", "train")
COMPARE_KEYS = ("presets", "prompt")


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
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when a GPU is visible); torchrun: cuda:LOCAL_RANK
    precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on the CPU) | fp32 | bf16
    # firing-rate regulariser (rates.py): loss += rate_weight * mean over the LIF layers of max(0, rate - target)^2,
    # a layer's rate being its spikes per neuron per step (0: off). rate_target: one target for every LIF layer, or
    # a table {glob over the layers' names = target} (e.g. {"blocks.*.mlp.*" = 0.05, "*" = 0.1}), first match wins
    rate_weight: float = 0.0
    rate_target: float | dict[str, float] = 0.0
    # distillation (distill.py): loss = (1 - distill_weight) * CE + distill_weight * distill_temperature^2 *
    # KL(softmax(teacher / tau) || softmax(student / tau)); distill: the teacher's run (or checkpoint) directory,
    # or in `compare` the name of one of its presets (trained first, OUT/NAME); the teacher shares the vocabulary
    distill: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # inf and nan pass every comparison below that they should fail
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train.{f.name}={value}: give a finite number")
        self._check_levers()
        checks = [
            (self.tokenizer in ("char", "bpe", "word"), f"tokenizer={self.tokenizer!r}: choose char, bpe or word"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1"),
            (self.max_steps >= 1, f"max_steps={self.max_steps}: must be >= 1"),
            (
                self.max_minutes is None or self.max_minutes > 0,
                f"max_minutes={self.max_minutes}: must be > 0 (leave it out for no limit)",
            ),
            (
                self.lr > 0 and 0 <= self.min_lr <= self.lr,
                f"lr={self.lr:g}, min_lr={self.min_lr:g}: need lr > 0 and 0 <= min_lr <= lr",
            ),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay:g}: must be >= 0"),
            (0 <= self.beta1 < 1, f"beta1={self.beta1:g}: must be in [0, 1)"),
            (0 <= self.beta2 < 1, f"beta2={self.beta2:g}: must be in [0, 1)"),
            (self.grad_clip >= 0, f"grad_clip={self.grad_clip:g}: must be >= 0 (0 disables clipping)"),
            (self.eval_interval >= 1, f"eval_interval={self.eval_interval}: must be >= 1"),
            (self.checkpoint_interval >= 1, f"checkpoint_interval={self.checkpoint_interval}: must be >= 1"),
            (self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size}: must be >= 1"),
            (
                self.eval_batches is None or self.eval_batches >= 1,
                f"eval_batches={self.eval_batches}: must be >= 1 (leave it out for the whole split)",
            ),
            (self.log in ("csv", "tensorboard", "none"), f"log={self.log!r}: choose csv, tensorboard or none"),
            (
                isinstance(self.device, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device) is not None,
                f"device={self.device!r}: choose cpu, cuda, cuda:N or auto",
            ),
            (self.precision in ("auto", "fp32", "bf16"), f"precision={self.precision!r}: choose auto, fp32 or bf16"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"train.{msg}")  # named as in the config file and --set

    def _check_levers(self) -> None:
        """The regulariser's and the distillation's settings: valid, and never given where they would do nothing."""
        targets = self.rate_target if isinstance(self.rate_target, dict) else {"*": self.rate_target}
        checks = [
            (self.rate_weight >= 0, f"rate_weight={self.rate_weight:g}: must be >= 0 (0: no regulariser)"),
            (
                bool(targets) and all(isinstance(k, str) and k.strip() for k in targets),
                f"rate_target={self.rate_target!r}: give a number, or a table of LIF-name patterns and targets "
                '(e.g. {"blocks.*.mlp.*" = 0.05, "*" = 0.1})',
            ),
            (
                all(isinstance(t, int | float) and math.isfinite(t) and t >= 0 for t in targets.values()),
                f"rate_target={self.rate_target!r}: targets are spikes per neuron per step, finite and >= 0",
            ),
            (
                self.rate_weight > 0 or self.rate_target == 0,
                f"rate_target={self.rate_target!r} does nothing with rate_weight=0: set train.rate_weight > 0 to "
                "regularise the firing rates (or leave rate_target out)",
            ),
            (
                self.distill is None or (isinstance(self.distill, str) and self.distill.strip() != ""),
                f"distill={self.distill!r}: give the teacher's run directory (or, in compare, a preset's name)",
            ),
            (0 <= self.distill_weight <= 1, f"distill_weight={self.distill_weight:g}: must be in [0, 1]"),
            (self.distill_temperature > 0, f"distill_temperature={self.distill_temperature:g}: must be > 0"),
            (
                self.distill is not None or (self.distill_weight, self.distill_temperature) == DISTILL_DEFAULTS,
                f"distill_weight={self.distill_weight:g}, distill_temperature={self.distill_temperature:g} do "
                "nothing without a teacher: set train.distill (a trained run, or in compare a preset's name) or "
                "leave them out",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"train.{msg}")

    def without_teacher(self) -> TrainConfig:
        """These settings with distillation off (for the teacher's own run in a compare)."""
        weight, temperature = DISTILL_DEFAULTS
        return dataclasses.replace(self, distill=None, distill_weight=weight, distill_temperature=temperature)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        reject_unknown(cls, values, "training option(s)")
        return cls(**values)


DISTILL_DEFAULTS = (0.5, 1.0)  # distill_weight, distill_temperature


# ---------------------------------------------------------------------------------------------- the loop


# ---------------------------------------------------------------------------------------------- type checks
def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


MODEL_FIELDS = _fields(SpikeDecoderConfig)
TRAIN_FIELDS = _fields(TrainConfig)


def _fits(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(_fits(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if typing.get_origin(kind) is dict:
        key, item = typing.get_args(kind)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    return isinstance(value, kind)


def _kind_name(kind: Any) -> str:
    return re.sub(r"\bNoneType\b", "None", getattr(kind, "__name__", None) or str(kind).replace("typing.", ""))


def check_values(section: str, values: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """`values` unchanged if every key is a field and every value has its type; else a ConfigError naming both."""
    for key, value in values.items():
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown setting {section}.{key}; valid keys of [{section}]: {valid}")
        if not _fits(value, fields[key]):
            raise ConfigError(f"{section}.{key}={value!r}: expected {_kind_name(fields[key])}")
    return values


# ---------------------------------------------------------------------------------------------- files and --set
def parse_value(text: str) -> Any:
    """A TOML value (number, bool, quoted string, list) or, failing that, the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(item: str) -> tuple[list[str], Any]:
    """`section.key=value` (or `presets.NAME.key=value`) -> ([section, (NAME,) key], value), validated."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: use section.key=value, e.g. --set model.n_layer=6")
    section = parts[0]
    if section not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    if section == "presets":
        if len(parts) != 3:
            raise ConfigError(f"--set {item!r}: use presets.NAME.key=value, e.g. --set presets.ann.n_layer=6")
        if parts[1] not in PRESETS:
            raise ConfigError(f"--set {item!r}: unknown preset {parts[1]!r}; valid presets: {', '.join(PRESETS)}")
    elif len(parts) != 2:
        raise ConfigError(f"--set {item!r}: use section.key=value, e.g. --set model.n_layer=6")
    value = parse_value(value)
    fields = {"model": MODEL_FIELDS, "presets": MODEL_FIELDS, "train": TRAIN_FIELDS}.get(section)
    if section == "compare":
        fields = {"presets": list[str], "prompt": str}
    if fields is not None:
        check_values(".".join(parts[:-1]), {parts[-1]: value}, fields)
    return parts, value


def load_config_file(path: str | None, sets: list[str]) -> dict[str, Any]:
    """Read a TOML config; the --set values are kept apart (under COMMAND_LINE) so that they win over every section
    of the file (see the module docstring)."""
    config: dict[str, Any] = {}
    if path:
        try:
            config = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"config file {path} is a directory; give a TOML file such as configs/run.toml") from exc
        except (PermissionError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read as text ({exc}); give a UTF-8 TOML file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    command_line: dict[str, Any] = {}
    for item in sets:
        parts, value = parse_set(item)
        if parts[0] in ("model", "train", "presets"):
            node = command_line
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        else:  # sections without layers (compare, study): the command line simply replaces the file's value
            config.setdefault(parts[0], {})[parts[1]] = value
    config[COMMAND_LINE] = command_line
    return config


# ---------------------------------------------------------------------------------------------- the merge
def model_settings(config: dict[str, Any], preset: str, variant: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model overrides for `preset` (on top of its defaults), by the module's precedence rule."""
    cli = config.get(COMMAND_LINE, {})
    layers = [
        ("model", config.get("model", {})),
        (f"presets.{preset}", config.get("presets", {}).get(preset, {})),
        ("model", variant or {}),
        ("model", cli.get("model", {})),
        (f"presets.{preset}", cli.get("presets", {}).get(preset, {})),
    ]
    merged: dict[str, Any] = {}
    for section, values in layers:
        merged.update(check_values(section, values, MODEL_FIELDS))
    return merged


def model_config(
    config: dict[str, Any], preset: str | None = None, variant: dict[str, Any] | None = None
) -> SpikeDecoderConfig:
    """The validated model config of `preset` (default: the file's `preset`, else spikedecoder)."""
    name = preset or config.get("preset", "spikedecoder")
    return SpikeDecoderConfig.from_preset(name, **model_settings(config, name, variant))


def train_settings(
    config: dict[str, Any], variant: dict[str, Any] | None = None, **command_line: Any
) -> dict[str, Any]:
    """The training settings, by the same rule; `command_line` holds --data/--steps/--minutes (None: not given)."""
    layers = [
        config.get("train", {}),
        variant or {},
        config.get(COMMAND_LINE, {}).get("train", {}),
        {k: v for k, v in command_line.items() if v is not None},
    ]
    merged: dict[str, Any] = {}
    for values in layers:
        merged.update(check_values("train", values, TRAIN_FIELDS))
    return merged


def train_config(config: dict[str, Any], variant: dict[str, Any] | None = None, **command_line: Any) -> TrainConfig:
    return TrainConfig.from_dict(train_settings(config, variant, **command_line))
