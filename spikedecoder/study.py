"""The study: train a grid of variants of the ablation ladder, measure each one's quality and energy per
token, and write the quality-vs-energy frontier. `spikedecoder study configs/studies/default.toml --out runs/study`.

A study file is TOML, laid out like configs/run.toml plus a list of variants:

    [study]            what to measure: baseline (the ANN variant's name), energy_preset, energy_windows, threads,
                       final_eval_batches, gpu (the study file `--scale gpu` switches to)
    [model]            base model settings shared by every variant
    [train]            training settings shared by every variant
    [presets.NAME]     overrides applied to every variant of preset NAME
    [[variants]]       name, preset, group (a label for the tables and plots), description, and optional
                       `model = {...}` / `train = {...}` overrides of this variant only; `train = {distill =
                       "NAME"}` learns from the run of variant NAME (listed, so trained, before it), and the
                       teacher's cost goes into the variant's result.json (`distill`)

Every variant trains in OUT/runs/NAME with the resumable `train()` loop. When it has reached max_steps, the study
evaluates it on the whole validation split, measures its energy on validation text (`energy.energy_report`) and
stores everything in OUT/runs/NAME/result.json. A rerun skips variants whose result.json matches their settings
(an interrupted one resumes from its checkpoint) and only rewrites the aggregate files (study_report.py):
results.csv, results.md, frontier.png, curves.png and firing_rates.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_json, resolve
from .config import ConfigError, SpikeDecoderConfig, field_default
from .rundir import check_writable, checkpoint_dir, has_checkpoint, load_checkpoint, read_history, validation_ids
from .runtime import evaluate
from .settings import TrainConfig, load_config_file, model_config, train_config
from .study_report import PLOTS, aggregate, markdown
from .train import prepare_data, train

RESULT = "result.json"
STUDY_KEYS = {
    "description": "",
    "baseline": "ann",  # the variant every other one is compared with
    "energy_preset": "fp32",  # 45 nm prices: fp32, fp16 or int8
    "energy_memory": False,  # add SRAM reads of the weights
    "energy_windows": 4,  # validation windows of max_len tokens used to count operations and firing rates
    "final_eval_batches": "all",  # batches of the final evaluation ("all": the whole validation split)
    "threads": None,  # torch intra-op threads (None: torch's default)
    "gpu": None,  # study file that `--scale gpu` uses instead of this one (relative to this file)
}
VARIANT_KEYS = {"name", "preset", "group", "description", "model", "train"}
# settings that do not change what a finished run has learnt: changing them does not invalidate its result
UNTRACKED_TRAIN = {"max_minutes", "checkpoint_interval", "log", "device"}


# ---------------------------------------------------------------------------------------------- configuration
@dataclass
class Variant:
    """One cell of the grid: a named model and how to train it."""

    name: str
    group: str
    preset: str
    description: str
    model: SpikeDecoderConfig
    train: TrainConfig

    def fingerprint(self) -> dict[str, Any]:
        """What the trained weights depend on; a stored result is reused only when this is unchanged."""
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k not in UNTRACKED_TRAIN}
        return {"model": self.model.to_dict(), "train": train}


def load_study(path: str | Path, sets: list[str] | None = None, scale: str = "cpu") -> dict[str, Any]:
    """Read a study file (switching to its GPU twin for scale='gpu') and apply `section.key=value` overrides."""
    path = Path(path)
    if scale == "gpu":
        given = load_config_file(str(path), [])
        if given.get("study", {}).get("gpu"):
            path = path.parent / given["study"]["gpu"]
        elif given.get("train", {}).get("device", "cpu") == "cpu":
            raise ConfigError(
                f'{path} names no GPU study ([study] gpu = "FILE") and is not one itself; '
                "use configs/studies/gpu.toml or drop --scale gpu"
            )
    config = load_config_file(str(path), sets or [])
    config["_path"] = str(path)
    return config


def study_settings(config: dict[str, Any]) -> dict[str, Any]:
    given = dict(config.get("study", {}))
    unknown = sorted(set(given) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"unknown [study] option(s) {unknown}; valid: {', '.join(sorted(STUDY_KEYS))}")
    settings = {**STUDY_KEYS, **given}
    if settings["final_eval_batches"] == "all":  # TOML has no null: "all" means the whole validation split
        settings["final_eval_batches"] = None
    batches = settings["final_eval_batches"]
    if batches is not None and not (isinstance(batches, int) and batches >= 1):
        raise ConfigError(f'[study] final_eval_batches={batches!r}: give a number of batches >= 1, or "all"')
    windows = settings["energy_windows"]
    if not (isinstance(windows, int) and windows >= 1):
        raise ConfigError(f"[study] energy_windows={windows!r}: give a number of validation windows >= 1")
    return settings


def plan(config: dict[str, Any], data: str | None = None) -> list[Variant]:
    """The variants of a study, each with its validated model and training config."""
    variants = config.get("variants")
    if not variants:
        raise ConfigError("the study defines no variants; add [[variants]] tables with name and preset")
    out, seen = [], set()
    for i, v in enumerate(variants):
        unknown = sorted(set(v) - VARIANT_KEYS)
        if unknown:
            raise ConfigError(f"variant {i + 1}: unknown key(s) {unknown}; valid: {', '.join(sorted(VARIANT_KEYS))}")
        name = v.get("name") or v.get("preset")
        if not name or "preset" not in v:
            raise ConfigError(f"variant {i + 1} needs a preset (ann, spiking-attention, ..., spikedecoder)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*", name):
            raise ConfigError(f"variant name {name!r} must be usable as a directory name (letters, digits, -_.+=)")
        if name in seen:
            raise ConfigError(f"variant name {name!r} appears twice; names must be unique")
        seen.add(name)
        preset = v["preset"]
        try:
            model = model_config(config, preset, v.get("model", {}))
            tcfg = train_config(config, v.get("train", {}), data=data or None)
        except ConfigError as exc:
            raise ConfigError(f"variant {name!r}: {exc}") from exc
        out.append(Variant(name, v.get("group", preset), preset, v.get("description", ""), model, tcfg))
    return out


# ---------------------------------------------------------------------------------------------- one variant
def _checkpoint_step(run_dir: Path) -> int:
    """Steps the run's checkpoint has reached (0 without one)."""
    try:
        training = resolve(checkpoint_dir(run_dir)) / "training.json"  # the previous one after a torn swap
        return int(json.loads(training.read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _check_same(run_dir: Path, old: dict, variant: Variant) -> None:
    """A run trained with other settings than the variant's is an error (never silently mixed in or continued)."""
    new = variant.fingerprint()
    old = {"model": dict(old.get("model", {})), "train": dict(old.get("train", {}))}
    # an option added after the run was trained, at its default here: the run used that default behaviour
    for section, cls in (("model", SpikeDecoderConfig), ("train", TrainConfig)):
        defaults = {f.name: field_default(f) for f in dataclasses.fields(cls)}
        for key in set(new.get(section, {})) - set(old[section]):
            if new[section][key] == defaults.get(key, dataclasses.MISSING):
                del new[section][key]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in set(old["train"]) - set(defaults) | UNTRACKED_TRAIN:  # an option TrainConfig no longer has
        old["train"].pop(key, None)
    changed = _changed(old, new)
    if changed:
        raise ConfigError(
            f"{run_dir} was trained with other settings ({', '.join(changed[:6])} changed); "
            "use another --out directory, or delete that run to retrain it"
        )


def stored_result(run_dir: Path, variant: Variant) -> dict | None:
    """The run's result.json, or None; a result from other settings is an error (never silently mixed in)."""
    path = run_dir / RESULT
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: measure again
    _check_same(run_dir, result.get("fingerprint", {}), variant)
    return result


def check_checkpoint(run_dir: Path, variant: Variant) -> None:
    """A checkpoint without a result (an interrupted variant) is resumed only if it has the variant's settings
    (max_steps aside: a longer budget continues it), never continued with, say, another learning rate."""
    if not has_checkpoint(run_dir):
        return
    ckpt = resolve(checkpoint_dir(run_dir))
    train = {k: v for k, v in read_json(ckpt / "training.json").get("train", {}).items() if k != "max_steps"}
    train["max_steps"] = variant.train.max_steps
    model = read_json(ckpt / "config.json") | {"vocab_size": variant.model.vocab_size}  # the tokenizer's, not a setting
    _check_same(run_dir, {"model": model, "train": train}, variant)


def measure(run_dir: Path, variant: Variant, settings: dict[str, Any]) -> dict[str, Any]:
    """Final validation metrics (whole split unless limited) and the energy report of the trained checkpoint."""
    from .data import unit_name
    from .energy import energy_report, validation_windows

    model, tokenizer, meta = load_checkpoint(run_dir)
    ids = validation_ids(meta, tokenizer)
    device = variant.train.device  # evaluate where it trained (fp32); count ops on the CPU
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and torch.cuda.is_available():
        model.to(device)
    val = evaluate(model, ids, unit_name(tokenizer), variant.train.eval_batch_size, settings["final_eval_batches"])
    model.to("cpu")
    idx = validation_windows(ids, model.config.max_len, settings["energy_windows"])
    report = energy_report(model, idx, settings["energy_preset"], memory=settings["energy_memory"])
    report["data"] = f"validation split: {idx.shape[0]} windows x {idx.shape[1]} tokens"
    measured = {
        "step": int(meta.get("step", 0)),
        "train_seconds": float(meta.get("train_seconds", 0.0)),
        "params": model.num_params(),
        "val": val,
        "energy": report,
    }
    if "distill" in meta:  # what the teacher cost besides this training (distill.py)
        measured["distill"] = meta["distill"]
    return measured


def energy_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in ("energy_preset", "energy_memory", "energy_windows", "final_eval_batches")}


def data_key(cfg: TrainConfig) -> tuple:
    """What the prepared token data depends on (variants that share it share one copy)."""
    return tuple(getattr(cfg, k) for k in ("data", "tokenizer", "vocab_size", "unk", "val_frac", "test_frac"))


def teachers(variants: list[Variant], out: Path) -> dict[str, Path]:
    """{variant: its teacher's run} for the variants whose train.distill names another variant of the study (OUT/
    runs/NAME); that variant must come earlier, so that it has trained first. Any other distill is a directory."""
    names = [v.name for v in variants]
    found = {}
    for i, v in enumerate(variants):
        if v.train.distill in names:
            if names.index(v.train.distill) >= i:
                raise ConfigError(
                    f"variant {v.name!r}: train.distill={v.train.distill!r} names a variant listed after it (or "
                    f"itself); list {v.train.distill!r} before {v.name!r} so that the teacher trains first"
                )
            found[v.name] = out / "runs" / v.train.distill
    return found


def run_variant(
    variant: Variant,
    run_dir: Path,
    settings: dict[str, Any],
    data_cache: dict,
    progress: bool,
    log=print,
    teacher_dir: Path | None = None,
) -> tuple[dict[str, Any], str]:
    """Train (or resume) and measure one variant; returns (its result, what was done: skipped/measured/trained).
    teacher_dir: where its train.distill lies, when it names another variant."""
    result = stored_result(run_dir, variant)
    finished = result is not None and result.get("step") == variant.train.max_steps
    if finished and result.get("measure") == energy_settings(settings):
        return result, "skipped"
    action = "measured"
    if _checkpoint_step(run_dir) < variant.train.max_steps:
        key = data_key(variant.train)
        if key not in data_cache:
            data_cache[key] = prepare_data(variant.train)
        if result is None:
            check_checkpoint(run_dir, variant)
        started = _checkpoint_step(run_dir)
        log(f"  training {variant.name}" + (f" (resuming at step {started})" if started else ""))
        train(variant.model, variant.train, run_dir, resume=True, progress=progress, data=data_cache[key],
              teacher_dir=teacher_dir)  # fmt: skip
        action = "trained"
    log(f"  measuring {variant.name}")
    t0 = time.time()
    measured = measure(run_dir, variant, settings)
    result = {
        "name": variant.name,
        "group": variant.group,
        "preset": variant.preset,
        "description": variant.description,
        "fingerprint": variant.fingerprint(),
        "measure": energy_settings(settings),
        "max_steps": variant.train.max_steps,
        **measured,
        "measure_seconds": time.time() - t0,
        "history": read_history(run_dir),
    }
    tmp = run_dir / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(run_dir / RESULT)
    return result, action


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study file (see configs/studies/)")
    p.add_argument("--out", required=True, help="study directory: runs/NAME per variant, results.* and plots")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: use the study file named by [study] gpu (bigger models, for a lent GPU)")  # fmt: skip
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a setting of every variant, e.g. --set train.max_steps=100 (default: none)",
    )
    p.add_argument("--data", help="UTF-8 text file to train on (default: built-in Shakespeare)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="train only these variants; the tables show all done (default: every variant)",
    )
    p.add_argument("--aggregate-only", action="store_true", help="train nothing: rewrite the tables and plots")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: [study] threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default when not a terminal)")


def run(args: argparse.Namespace) -> int:
    config = load_study(args.config, args.set, args.scale)
    settings = study_settings(config)
    variants = plan(config, args.data)
    names = [v.name for v in variants]
    if settings["baseline"] not in names:
        raise ConfigError(f"[study] baseline={settings['baseline']!r} is not a variant; variants: {', '.join(names)}")
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise ConfigError(f"--only {unknown}: no such variant; variants: {', '.join(names)}")
    out = Path(args.out)
    taught = teachers(variants, out)
    threads = args.threads or settings["threads"]
    if threads:
        torch.set_num_threads(int(threads))
    check_writable(out)
    data_cache: dict = {}
    for v in variants:  # bad data, or a run trained with other settings, fails before anything is written
        if args.aggregate_only or (args.only and v.name not in args.only):
            continue
        if stored_result(out / "runs" / v.name, v) is None:
            check_checkpoint(out / "runs" / v.name, v)
        if _checkpoint_step(out / "runs" / v.name) < v.train.max_steps and data_key(v.train) not in data_cache:
            data_cache[data_key(v.train)] = prepare_data(v.train)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "study.toml").write_text(Path(config["_path"]).read_text())
    progress = not args.no_progress and sys.stderr.isatty()
    command = " ".join(
        ["spikedecoder study", args.config, "--out", args.out]
        + (["--scale", args.scale] if args.scale != "cpu" else [])
        + [f"--set {item}" for item in args.set]
        + ([f"--data {args.data}"] if args.data else [])
    )
    results, missing = [], []
    start = time.time()
    for i, v in enumerate(variants, 1):
        run_dir = out / "runs" / v.name
        if args.aggregate_only or (args.only and v.name not in args.only):
            r = stored_result(run_dir, v)
            if r is not None and r.get("measure") == energy_settings(settings):
                results.append(r)
            else:
                missing.append(v.name)
            continue
        print(f"[{i}/{len(variants)}] {v.name} ({v.preset}, T={v.model.timesteps}, {v.train.max_steps} steps)",
              flush=True)  # fmt: skip
        t0 = time.time()
        r, action = run_variant(v, run_dir, settings, data_cache, progress, lambda s: print(s, flush=True),
                                taught.get(v.name))  # fmt: skip
        results.append(r)
        metric = "bits_per_char" if "bits_per_char" in r["val"] else "perplexity"
        print(f"  {action} in {time.time() - t0:.0f} s: val {metric} {r['val'][metric]:.3f}, "
              f"{r['energy']['total_pj_per_token']:,.0f} pJ/token", flush=True)  # fmt: skip
        if action != "skipped":  # keep the tables current while a long study runs
            aggregate(results, out, settings, command, missing + [w.name for w in variants[i:]])
    rows = aggregate(results, out, settings, command, missing)
    print(f"\nstudy done in {time.time() - start:.0f} s; results in {out}/results.md, results.csv and "
          f"{', '.join(PLOTS)}\n")  # fmt: skip
    print("\n".join(markdown(rows, settings, settings["baseline"], command, missing).splitlines()[6:]) if rows else "")
    return 0
