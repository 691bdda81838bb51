"""Command line: `spikedecoder train | compare | generate | evaluate | info | energy | study | serve | export`."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .help import EXAMPLES, INTERRUPTED, PRECEDENCE, SAFETY, HelpFormatter
from .optim import TrainingDiverged
from .rundir import claim_run_dirs, removed_if_left_empty
from .settings import TrainConfig, load_config_file, model_config
from .settings import train_config as settings_train_config


def train_config(config: dict[str, Any], args: argparse.Namespace) -> TrainConfig:
    """The training settings with --data/--steps/--minutes on top (see settings.py for the precedence)."""
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: give a number of steps >= 1 (leave it out for the config's)")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ConfigError(
            f"--minutes {args.minutes:g}: give a time budget > 0, a finite number of minutes (leave it out for none)"
        )
    given = {"data": args.data, "max_steps": args.steps, "max_minutes": args.minutes}
    return settings_train_config(config, **given)


# ---------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    config = load_config_file(args.config, args.set)
    mcfg, tcfg = model_config(config, args.preset), train_config(config, args)
    with claim_run_dirs([Path(args.out)], args.resume, args.force) as (resume,):
        result = train(mcfg, tcfg, args.out, resume=resume, **allowed_changes(args))
    if result["rank"] == 0:
        print(json.dumps(result["val"], indent=2))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .generate import generate_text
    from .rundir import load_checkpoint
    from .train import prepare_data, train

    config = load_config_file(args.config, args.set)
    tcfg = train_config(config, args)
    presets = args.presets or config.get("compare", {}).get("presets", ["spikedecoder", "ann"])
    presets, teacher = teacher_first(presets, tcfg.distill)
    models = [model_config(config, name) for name in presets]  # every preset's settings checked before any work
    out = Path(args.out)
    with claim_run_dirs([out / name for name in presets], args.resume, args.force) as resume:
        data = prepare_data(tcfg)
        prompt = config.get("compare", {}).get("prompt", "ROMEO:\n")
        try:  # the samples' prompt is checked before hours of training, not after
            data.tokenizer.encode(prompt)
        except DataError as exc:
            raise ConfigError(f"compare.prompt {prompt!r}: {exc}; set one with --set compare.prompt='\"...\"'") from exc
        rows = []
        for name, mcfg, again in zip(presets, models, resume, strict=True):
            print(f"\n=== training {name} ===" + (f" (distilled from {tcfg.distill})" if name != teacher and
                  tcfg.distill else ""), flush=True)  # fmt: skip
            run_cfg, teacher_dir = tcfg, None
            if teacher is not None:  # the teacher trains without one; the others learn from OUT/TEACHER
                run_cfg, teacher_dir = (tcfg.without_teacher(), None) if name == teacher else (tcfg, out / teacher)
            result = train(mcfg, run_cfg, out / name, resume=again, data=data, teacher_dir=teacher_dir,
                           **allowed_changes(args))  # fmt: skip
            rows.append((name, result))
    for name, _ in rows:
        model, tokenizer, _ = load_checkpoint(out / name)
        print(f"\n--- sample from {name} (seed 0, temperature 0.8) ---")
        print(prompt + generate_text(model, tokenizer, prompt, 300, temperature=0.8, top_k=None, seed=0))
    print("\n" + results_table(rows))
    for name, r in rows:
        if "distill" in r:
            print(distill_note(name, r["distill"]))
    (out / "results.json").write_text(json.dumps({n: r for n, r in rows}, indent=2) + "\n")
    return 0


def distill_note(name: str, facts: dict) -> str:
    """What a distilled run cost besides its own training: the teacher's training, and its forwards."""
    return (
        f"{name} learnt from {facts['teacher_preset']} ({facts['teacher']}; weight {facts['weight']:g}, temperature "
        f"{facts['temperature']:g}): the teacher trained {facts['teacher_train_seconds']:.0f} s, and its forwards "
        f"added {facts['teacher_forward_seconds']:.0f} s ({facts['teacher_forward_seconds_per_step'] * 1e3:.1f} ms "
        f"per step, {facts['teacher_forward_share']:.0%} of this training's time)"
    )


def teacher_first(presets: list[str], distill: str | None) -> tuple[list[str], str | None]:
    """The presets in training order and the one train.distill names, if any: a preset's name means its run in this
    compare (OUT/NAME), trained first, without a teacher; any other value is a run directory, checked now."""
    from .config import PRESETS

    if distill is None:
        return presets, None
    if distill in presets:
        return [distill, *[p for p in presets if p != distill]], distill
    if distill in PRESETS:
        raise ConfigError(
            f"train.distill={distill!r} names a preset this compare does not train ({', '.join(presets)}): add it "
            "to --presets (or compare.presets), or give the teacher's run directory"
        )
    if not Path(distill).is_dir():
        raise ConfigError(
            f"train.distill={distill!r}: no such run directory; give a trained run (or checkpoint) directory, or "
            f"the name of a preset this compare trains ({', '.join(presets)})"
        )
    return presets, None


def allowed_changes(args: argparse.Namespace) -> dict[str, bool]:
    """What a resume may change (--data-changed ok, --settings-changed ok; see resume.py)."""
    return {
        "allow_data_change": args.data_changed == "ok",
        "allow_settings_change": args.settings_changed == "ok",
    }


def results_table(rows: list[tuple[str, dict]]) -> str:
    metric = "bits_per_char" if "bits_per_char" in rows[0][1]["val"] else "perplexity"
    lines = [f"| model | params | steps | train s | val {metric} | val accuracy |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        v = r["val"]
        lines.append(
            f"| {name} | {r['params']:,} | {r['step']} | {r['train_seconds']:.0f} | {v[metric]:.3f} | "
            f"{v['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_text
    from .rundir import load_checkpoint

    check_generate_args(args)
    model, tokenizer, _ = load_checkpoint(args.checkpoint)
    model = with_engine(model, args.engine)
    prompt = unescape(args.prompt) if args.escapes else args.prompt
    stop = [unescape(s) for s in args.stop] or None
    pending = [prompt]  # echoed with the first new text, so a rejected prompt prints nothing

    def stream(piece: str) -> None:
        sys.stdout.write("".join(pending) + piece)
        sys.stdout.flush()
        pending.clear()

    generate_text(
        model,
        tokenizer,
        prompt,
        args.tokens,
        stop=stop,
        stream=stream,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        incremental=not args.no_cache,
    )
    sys.stdout.write("".join(pending) + "\n")
    return 0


def check_generate_args(args: argparse.Namespace) -> None:
    """generate's options checked by their flags' names, before the model is loaded."""
    from .generate import MIN_TEMPERATURE

    checks = [
        (args.tokens >= 0, f"--tokens {args.tokens}: give a number of new tokens >= 0"),
        (
            math.isfinite(args.temperature) and args.temperature >= 0,
            f"--temperature {args.temperature:g}: give a finite number >= 0 (0 is greedy)",
        ),
        (
            not 0 < args.temperature < MIN_TEMPERATURE,
            f"--temperature {args.temperature:g}: too small to divide the logits by (they overflow); give 0 for "
            f"greedy decoding or at least {MIN_TEMPERATURE}",
        ),
        (args.top_k is None or args.top_k >= 1, f"--top-k {args.top_k}: give a number of tokens >= 1"),
        (args.top_p is None or 0 < args.top_p <= 1, f"--top-p {args.top_p}: give a probability in (0, 1]"),
        (
            args.seed is None or -(2**63) <= args.seed < 2**64,
            f"--seed {args.seed}: give an integer between -2**63 and 2**64 - 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for flag, texts in (("--prompt", [args.prompt]), ("--stop", args.stop)):
        for text in texts:
            check_utf8(flag, text)


def check_utf8(flag: str, text: str) -> None:
    """Arguments that are not valid UTF-8 reach Python as lone surrogates (os.fsdecode); name the byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = os.fsencode(text[exc.start])
        raise ValueError(
            f"{flag} holds a byte that is not valid UTF-8 ({byte!r} at character {exc.start}); pass UTF-8 text "
            "(with --escapes, a character can be written as \\u00e9)"
        ) from None


def with_engine(model, engine: str):
    """The model as loaded (dense), or its event-driven copy (spikedecoder.events)."""
    if engine == "events":
        from .events import to_events

        return to_events(model)
    return model


def add_engine_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", choices=("dense", "events"), default="dense",
        help="dense: the training path; events: event-driven inference, same answers (spikedecoder.events)",
    )  # fmt: skip


_ESCAPE = re.compile(r"""\\(?:[\\'"abfnrtv]|[0-7]{1,3}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]+\})""")


def unescape(text: str) -> str:
    """Python's backslash escapes (\\n, \\t, \\x41, \\u00e9, ...) decoded; every other character, non-ASCII
    included, kept as it is (unicode_escape on the whole text would read UTF-8 bytes as Latin-1)."""
    return _ESCAPE.sub(lambda m: codecs.decode(m.group(0), "unicode_escape"), text)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    from .data import unit_name
    from .rundir import load_checkpoint, split_ids_for
    from .runtime import evaluate

    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches}: give a number of batches >= 1 (leave it out for the whole text)")
    model, tokenizer, meta = load_checkpoint(args.checkpoint)
    model = with_engine(model, args.engine)
    skipped = 0
    if args.data is not None:
        if args.split is not None:
            raise ValueError("--split picks a part of the training text; with --data the whole file is evaluated")
        ids, skipped = encode_file(tokenizer, args.data, args.unknown)
        source = str(Path(args.data).resolve())
    else:
        ids = split_ids_for(meta, tokenizer, args.split or "val")
        source = f"{args.split or 'val'} split of the training text"
    if len(ids) < 2:
        raise ValueError(f"{args.data} holds {len(ids)} token(s); evaluation needs at least 2 (one to predict)")
    unit = unit_name(tokenizer)
    metrics = evaluate(model, ids, unit, max_batches=args.batches, progress=True)
    if unit != "char":  # bits per character of the text the predicted tokens spell
        chars = len(tokenizer.decode(ids[1 : metrics["tokens"] + 1]))
        metrics["bits_per_char"] = metrics["loss"] * metrics["tokens"] / math.log(2) / max(chars, 1)
        metrics["chars"] = chars
    metrics["data"] = source
    if args.data is None:
        metrics["split"] = args.split or "val"
    else:
        metrics["skipped_chars"] = skipped
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:>15}: {value:.4f}" if isinstance(value, float) else f"{key:>15}: {value}")
    return 0


def encode_file(tokenizer: Any, path: str, unknown: str) -> tuple[Any, int]:
    """Token ids of a UTF-8 file and how many characters were left out: characters the (char) tokenizer does not
    know are an error listing them, or with unknown='skip' dropped."""
    from .data import UnknownCharacterError, _encode_tensor, read_text_file

    text = read_text_file(path)
    try:
        return _encode_tensor(tokenizer, text), 0
    except UnknownCharacterError as exc:
        counts = {c: text.count(c) for c in exc.chars}
        if unknown != "skip":
            shown = ", ".join(repr(c) for c in exc.chars[:20]) + (" ..." if len(exc.chars) > 20 else "")
            raise ValueError(
                f"{path} has {len(exc.chars)} character(s) the model's vocabulary lacks ({sum(counts.values())} "
                f"occurrences): {shown}; pass --unknown skip to leave them out"
            ) from None
        kept = text.translate({ord(c): None for c in exc.chars})
        return _encode_tensor(tokenizer, kept), sum(counts.values())


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run

    code = run(args)
    # stopped (Ctrl-C): nothing is left to save, and tearing down torch and the loaded kernels at interpreter exit
    # takes over a second on a busy machine, so the process ends here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_info(args: argparse.Namespace) -> int:
    from .model import SpikeDecoder

    if args.checkpoint:
        from .rundir import load_checkpoint

        model, _, meta = load_checkpoint(args.checkpoint)
    else:
        model, meta = SpikeDecoder(model_config(load_config_file(None, args.set), args.preset)), {}
    print(f"parameters: {model.num_params():,}")
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + p.numel()
    for name, count in groups.items():
        print(f"  {name:<8} {count:,}")
    print("config:")
    for key, value in model.config.to_dict().items():
        print(f"  {key:<20} {value}")
    if meta:
        print(f"trained steps: {meta.get('step')}, seconds: {meta.get('train_seconds', 0):.0f}")
        if meta.get("history"):
            print(f"last validation: {meta['history'][-1]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model
    from .rundir import load_checkpoint

    model, tokenizer, _ = load_checkpoint(args.checkpoint)
    summary = export_model(model, tokenizer, args.out_file)
    print(f"wrote {args.out_file}: {summary['kind']} model, {summary['bytes']:,} bytes; run it with runtime/sd")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikedecoder",
        description="Train spiking GPT language models, compare them with their ANN twin, measure energy per token.",
        epilog=PRECEDENCE + "\n\n" + SAFETY,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        epilog = EXAMPLES[name] + ("\n\n" + PRECEDENCE if name in ("train", "compare", "info", "study") else "")
        epilog += "\n\n" + SAFETY if name in ("train", "compare") else ""
        return sub.add_parser(name, help=help_text, description=help_text, epilog=epilog, formatter_class=HelpFormatter)

    def config_args(p: argparse.ArgumentParser, with_file: bool = True) -> None:
        if with_file:
            p.add_argument("config", nargs="?", help="TOML config file (see configs/; default: the preset alone)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a setting (repeatable; default: none)")  # fmt: skip
        p.add_argument("--data", help="UTF-8 text file to train on (default: the config's, else built-in Shakespeare)")
        p.add_argument("--steps", type=int, help="training steps >= 1 (default: the config's train.max_steps)")
        p.add_argument("--minutes", type=float,
                       help="wall-time budget per model, > 0 (default: the config's, else none)")  # fmt: skip

    def run_args(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--resume", action="store_true", help=f"continue {what} from its checkpoint")
        p.add_argument(
            "--force",
            action="store_true",
            help=f"train {what} anew though --out holds one (the old checkpoint and log stay until replaced)",
        )
        p.add_argument(
            "--data-changed", choices=("ok",),
            help="with --resume: go on training on a text other than the run's (its SHA-256 differs; the run's "
            "vocabulary is kept) (default: refused, naming the two files)",
        )  # fmt: skip
        p.add_argument(
            "--settings-changed", choices=("ok",),
            help="with --resume: go on with other optimisation settings than the run's (lr, batch_size, "
            "warmup_steps, ...) (default: refused, naming each change; max_steps, max_minutes, the intervals, log "
            "and device may change freely, with a note)",
        )  # fmt: skip

    p = command("train", "Train one model (a preset of the ablation ladder plus overrides).")
    config_args(p)
    p.add_argument("--preset", help="ann, spiking-attention, spiking-attention-mlp or spikedecoder "
                   "(default: the config's `preset`, else spikedecoder)")  # fmt: skip
    p.add_argument("--out", required=True, help="run directory (checkpoint/ and log.csv go here)")
    run_args(p, "the run")
    p.set_defaults(func=cmd_train)

    p = command("compare", "Train several presets on the same data and budget; print their metrics and samples.")
    config_args(p)
    p.add_argument("--presets", nargs="+", help="presets to train (default: the config's, or spikedecoder ann)")
    p.add_argument("--out", required=True, help="directory for one run per preset (OUT/PRESET)")
    run_args(p, "every preset's run")
    p.set_defaults(func=cmd_compare)

    p = command("generate", "Generate text from a trained model (streams tokens as they come).")
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("--prompt", default="\n", help="text to continue, in the training characters (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, help="maximum number of new tokens")
    p.add_argument(
        "--greedy", action="store_true", help="always take the most likely token (ignores the sampling options)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature >= 0: lower is more conservative, 0 is greedy",
    )
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probabilities add up to P, 0 < P <= 1 "
                   "(default: all)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None,
                   help="random seed: the same seed gives the same text (default: a fresh random draw)")  # fmt: skip
    p.add_argument("--stop", action="append", default=[],
                   help="stop when this string appears (repeatable; \\n etc. decoded; default: none)")  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window per token (reference)")
    p.add_argument(
        "--escapes",
        action="store_true",
        help="decode backslash escapes (\\n, \\t, \\u00e9) in the prompt; the rest stays as typed",
    )
    add_engine_argument(p)
    p.set_defaults(func=cmd_generate)

    p = command(
        "evaluate", "Evaluate a model on any UTF-8 text, or on the validation (or test) split it was trained on."
    )
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("--data", metavar="FILE", help="UTF-8 text file to evaluate whole (default: the training text)")
    p.add_argument("--unknown", choices=("error", "skip"), default="error",
                   help="characters outside the vocabulary: an error listing them (default), or skip them")  # fmt: skip
    p.add_argument(
        "--split",
        choices=("val", "test"),
        default=None,
        help="held-out split of the run's training text to evaluate (default: val, unless --data)",
    )
    p.add_argument("--batches", type=int, default=None, help="limit the number of batches (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_engine_argument(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("info", "Show parameters and configuration of a checkpoint or a preset.")
    p.add_argument("checkpoint", nargs="?", help="run or checkpoint directory (default: show --preset instead)")
    p.add_argument("--preset", default="spikedecoder", help="preset to show when no checkpoint is given")
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override a model setting of the preset (repeatable; default: none)")  # fmt: skip
    p.set_defaults(func=cmd_info)

    try:
        from . import energy
    except ImportError:
        energy = None
    if energy is not None and hasattr(energy, "add_arguments"):
        p = command("energy", "Measured energy per token of a model (and its ANN baseline), every operation priced.")
        energy.add_arguments(p)
        p.set_defaults(func=energy.run)

    p = command("serve", "A local web page: generate token by token and watch each token's energy and spikes.")
    p.set_defaults(func=cmd_serve)
    p.add_argument("checkpoint", help="run or checkpoint directory of the (spiking) model to serve")
    p.add_argument(
        "--baseline", metavar="ANN_RUN", help="run of the ANN twin: its energy on the same tokens (default: none)"
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--preset", default="fp32", choices=("fp32", "fp16", "int8"), help="energy per operation")
    p.add_argument("--max-streams", type=int, default=4,
                   help="streams generating at once; more get HTTP 429 (default 4)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the model steps (default 1: one token's step is too small to split over "
                   "cores, and the browser needs one)")  # fmt: skip

    p = command("export", "Write a trained model to one binary file for the standalone C runtime (runtime/sd).")
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("out_file", metavar="OUT.bin", help="file to write (format: runtime/README.md)")
    p.set_defaults(func=cmd_export)

    try:
        from . import study
    except ImportError:
        study = None
    if study is not None and hasattr(study, "add_arguments"):
        p = command("study", "Train a grid of variants and write the quality-vs-energy results (resumable).")
        study.add_arguments(p)
        p.set_defaults(func=study.run)
    return parser


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one `warning:` line on stderr (not Python's file:line and source echo)."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)
    shown, warnings.showwarning = warnings.showwarning, one_line_warning
    try:
        with removed_if_left_empty(out) if out else contextlib.nullcontext():
            return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        said = str(exc) if args.command in ("train", "compare") else ""  # training says what it kept
        print("\n" + (said or INTERRUPTED.get(args.command, "interrupted")), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, as Unix tools do; stdout goes to /dev/null so that
        # Python's final flush does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
