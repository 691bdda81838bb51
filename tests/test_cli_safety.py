"""Nothing lost, nothing ignored. An existing run is never overwritten unasked; every bad input ends with
exit code 2, one `error:` line naming the problem and the fix, nothing on stdout, and the files that were there
byte-identical; output paths are checked before any work; a closed pipe ends quietly; help shows defaults."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import TEXT, TINY, fails_with

import spikedecoder.train as train_module
from spikedecoder.cli import build_parser, main, unescape
from spikedecoder.help import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "harbour.txt"
    path.write_text(TEXT + "Le café était calme.\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_file: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "snn"
    argv = ["train", "--preset", "spikedecoder", *TINY, "--steps", "6", "--data", str(data_file), "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture()
def run(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (tests may try to overwrite it)."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _writable(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.fixture()
def read_only(tmp_path: Path):
    """A directory nobody can write in: chmod 555, and as root (who ignores modes) the immutable attribute."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if _writable(folder) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if _writable(folder):
            pytest.skip("cannot make a read-only directory here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def train_argv(data: Path, out: Path, *extra: str, preset: str = "spikedecoder") -> list[str]:
    return ["train", "--preset", preset, *TINY, "--data", str(data), "--out", str(out), *extra]


# ---------------------------------------------------------------------------------------------- existing runs
def test_train_into_an_existing_run_refuses_and_changes_nothing(run: Path, data_file: Path, capsys) -> None:
    before = snapshot(run)
    fails_with(capsys, train_argv(data_file, run, "--steps", "2"), "already holds a run", "--resume", "--force")
    assert snapshot(run) == before
    fails_with(capsys, train_argv(data_file, run, "--resume", "--force"), "contradict")
    assert snapshot(run) == before


def test_resume_with_nothing_to_resume_is_an_error(tmp_path: Path, data_file: Path, capsys) -> None:
    fails_with(capsys, train_argv(data_file, tmp_path / "new" / "run", "--resume"), "nothing to resume")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    fails_with(capsys, train_argv(data_file, tmp_path / "empty", "--resume"), "holds no checkpoint")
    assert list((tmp_path / "empty").iterdir()) == []


def test_force_keeps_the_previous_checkpoint_until_the_new_one_is_written(
    run: Path, data_file: Path, capsys, monkeypatch
) -> None:
    checkpoint = snapshot(run / "checkpoint")
    real = train_module.lm_loss
    monkeypatch.setattr(train_module, "lm_loss", lambda logits, y: real(logits, y) * float("nan"))
    argv = train_argv(data_file, run, "--force", "--steps", "3", "--set", "train.checkpoint_interval=2")
    fails_with(capsys, argv, "loss became nan at step 0", "no checkpoint was written yet")
    assert snapshot(run / "checkpoint") == checkpoint  # the new run died before its first checkpoint
    monkeypatch.setattr(train_module, "lm_loss", real)
    assert main(argv) == 0
    assert '"step": 3' in (run / "checkpoint" / "training.json").read_text()
    assert snapshot(run / "checkpoint") != checkpoint


def test_resume_continues_an_existing_run(run: Path, data_file: Path) -> None:
    assert main(train_argv(data_file, run, "--resume", "--steps", "8")) == 0
    assert '"step": 8' in (run / "checkpoint" / "training.json").read_text()


def test_compare_refuses_existing_runs_and_resumes_only_when_asked(
    run: Path, tmp_path: Path, data_file: Path, capsys
) -> None:
    out = tmp_path / "cmp"
    base = ["compare", "--presets", "spikedecoder", "ann", *TINY, "--data", str(data_file), "--out", str(out)]
    fails_with(capsys, base, "compare.prompt 'ROMEO:\\n'", "unknown character", "--set compare.prompt")
    assert not out.exists()  # the samples' prompt is checked before any training
    base += ["--set", 'compare.prompt="the "']
    fails_with(capsys, [*base, "--resume"], "nothing to resume", str(out / "spikedecoder"), str(out / "ann"))
    assert not out.exists()
    shutil.copytree(run, out / "spikedecoder")
    before = snapshot(out)
    fails_with(capsys, [*base, "--steps", "6"], f"{out / 'spikedecoder'} already holds a run", "--resume")
    assert snapshot(out) == before
    assert main([*base, "--steps", "6", "--resume"]) == 0  # spikedecoder is done (step 6); ann starts fresh
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith("spikedecoder/checkpoint/"))
    assert '"step": 6' in (out / "ann" / "checkpoint" / "training.json").read_text()


# ---------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--steps", "0"], ["--steps 0: give a number of steps >= 1", "leave it out"]),
        (["--steps", "-3"], ["--steps -3: give a number of steps >= 1"]),
        (["--minutes", "-1"], ["--minutes -1: give a time budget > 0"]),
        (["--minutes", "0"], ["--minutes 0: give a time budget > 0"]),
    ],
)
def test_bad_steps_and_minutes(tmp_path: Path, data_file: Path, capsys, extra, needles) -> None:
    fails_with(capsys, train_argv(data_file, tmp_path / "r", *extra), *needles)
    assert not (tmp_path / "r").exists()


def test_evaluate_batches_0_is_refused(trained: Path, capsys) -> None:
    fails_with(capsys, ["evaluate", str(trained), "--batches", "0"], "--batches 0: give a number of batches >= 1")


def test_a_directory_as_config_file(tmp_path: Path, capsys) -> None:
    fails_with(capsys, ["train", str(tmp_path), "--out", str(tmp_path / "r")], "is a directory", "TOML file")
    assert not (tmp_path / "r").exists()


def test_read_only_out_fails_before_any_work(read_only: Path, data_file: Path, capsys, monkeypatch) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "prepare_data", no_work)
    fails_with(capsys, train_argv(data_file, read_only / "run"), f"--out {read_only / 'run'}: cannot write in")
    fails_with(capsys, ["compare", "--out", str(read_only / "cmp")], "cannot write in", "writable directory")
    assert list(read_only.iterdir()) == []


def test_a_file_as_out_is_refused(tmp_path: Path, data_file: Path, capsys) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    fails_with(capsys, train_argv(data_file, target), f"--out {target}: {target} is a file, not a directory")
    assert target.read_text() == "keep me"


def test_bad_data_leaves_no_empty_output_folders(tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short")
    fails_with(capsys, train_argv(short, tmp_path / "a" / "b" / "run"), "too short")
    fails_with(capsys, ["compare", "--data", str(short), "--out", str(tmp_path / "c" / "cmp")], "too short")
    (tmp_path / "kept").mkdir()  # an empty folder that was there before stays
    fails_with(capsys, train_argv(short, tmp_path / "kept"), "too short")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "short.txt"]


# ---------------------------------------------------------------------------------------------- energy
@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--window", "0"], ["--window 0: give a number of tokens >= 1"]),
        (["--windows", "0"], ["--windows 0: give a number of windows >= 1"]),
        (["--window", "99"], ["--window 99 exceeds the model's max_len=24"]),
    ],
)
def test_energy_bad_windows(trained: Path, capsys, extra, needles) -> None:
    fails_with(capsys, ["energy", str(trained), *extra], *needles)


def test_energy_plot_path_is_checked_before_the_measure(
    trained: Path, tmp_path: Path, read_only: Path, capsys, monkeypatch
) -> None:
    import spikedecoder.energy.report as report

    def no_work(*args, **kwargs):
        raise AssertionError("measured before checking --plot")

    monkeypatch.setattr(report, "energy_report", no_work)
    before = snapshot(tmp_path)
    missing = tmp_path / "nope" / "e.png"
    fails_with(capsys, ["energy", str(trained), "--plot", str(missing)], "folder", "does not exist", "create it")
    fails_with(capsys, ["energy", str(trained), "--plot", str(read_only / "e.png")], "--plot", "cannot write in")
    fails_with(capsys, ["energy", str(trained), "--plot", str(tmp_path / "e.xyz")], "unknown image format", ".png")
    assert snapshot(tmp_path) == before and not (tmp_path / "nope").exists()


def test_energy_streams_windows_in_bounded_batches(trained: Path, capsys, monkeypatch) -> None:
    """--windows N counts at most WINDOW_BATCH windows per forward, and gives the counts of one big forward."""
    import torch

    import spikedecoder.energy.pricing as pricing
    from spikedecoder.energy import decode_report, energy_report, validation_windows, window_batches
    from spikedecoder.rundir import load_checkpoint, validation_ids

    model, tokenizer, meta = load_checkpoint(trained)
    ids = validation_ids(meta, tokenizer)
    idx = validation_windows(ids, 24, 20)
    assert torch.equal(torch.cat(list(window_batches(ids, 24, 20, batch=3))), idx)
    whole = energy_report(model, idx, batch=20)
    streamed = energy_report(model, window_batches(ids, 24, 20, batch=3))
    for key in ("total_pj_per_token", "total_pj_per_token_fanout", "synaptic_pj_per_token", "mean_firing_rate"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-12), key
    assert streamed["kind_counts"] == whole["kind_counts"] and streamed["tokens"] == whole["tokens"] == 20 * 24
    assert streamed["firing_rates"] == pytest.approx(whole["firing_rates"])
    assert streamed["batch"] == 20 and streamed["window"] == 24
    # decoding steps, batch by batch: each batch's step energies, weighted by its windows (a one-token step can be
    # all 0/1 in a small batch and not in a big one, so the batch size is part of the measure: WINDOW_BATCH)
    batched = decode_report(model, window_batches(ids, 24, 20, batch=3))
    parts = [(len(chunk), decode_report(model, chunk)["step_pj"]) for chunk in idx.split(3)]
    expected = [sum(n * steps[j] for n, steps in parts) / 20 for j in range(12)]
    assert batched["step_pj"] == pytest.approx(expected, rel=1e-12) and batched["positions"] == [12, 23]
    # batch 20 against batches of 3: within 2 % for binary spikes; the preset's graded counts leave more small
    # batches all 0/1 (or all small integers) where a big batch holds a float: up to 32 % apart per step here
    assert decode_report(model, idx, batch=20)["step_pj"] == pytest.approx(batched["step_pj"], rel=0.4)

    seen: list[int] = []
    real = pricing.count_ops

    def counted(m, chunk, **options):
        if "cache" not in options and options.get("invariant_once", True):  # a whole-window forward (decoding
            seen.append(chunk.shape[0])  # steps go one token at a time; the every-step figure counts a chunk again)
        assert chunk.shape[0] <= pricing.WINDOW_BATCH
        return real(m, chunk, **options)

    monkeypatch.setattr(pricing, "count_ops", counted)
    assert main(["energy", str(trained), "--windows", "37", "--json"]) == 0
    assert '"batch": 37' in capsys.readouterr().out
    assert max(seen) <= pricing.WINDOW_BATCH and sum(seen) == 37


# ---------------------------------------------------------------------------------------------- generate
def test_generate_into_a_closed_pipe_ends_quietly(trained: Path) -> None:
    """`spikedecoder generate ... | head -c 20`: the reader goes away after 20 bytes while tokens still come."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "spikedecoder.cli", "generate", str(trained), "--tokens", "20000", "--seed", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(proc.stdout.read(20)) == 20
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Error" not in err, err  # quiet: no BrokenPipeError, not even at exit


def test_ctrl_c_in_generate_says_what_happened(run: Path, capsys, monkeypatch) -> None:
    import spikedecoder.generate as generate_module

    def interrupted(model, tokenizer, prompt, tokens, stream, **options):
        stream(" lamp")
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, "generate_text", interrupted)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "the keeper lit the"]) == 130
    out, err = capsys.readouterr()
    assert out == "the keeper lit the lamp"
    assert "interrupted; the text generated so far is printed above" in err
    assert "checkpoint" not in err and "--resume" not in err


def test_escapes_keep_non_ascii_characters(trained: Path, capsys) -> None:
    assert unescape(r"caf\u00e9 é\n\t\\x") == "café é\n\t\\x"
    assert unescape("naïve – ok") == "naïve – ok"
    capsys.readouterr()
    argv = ["generate", str(trained), "--prompt", r"Le café\u00e9\n", "--escapes", "--tokens", "3", "--greedy"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("Le caféé\n")


# ---------------------------------------------------------------------------------------------- help
def test_every_option_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "compare", "generate", "evaluate", "info", "energy", "study"} <= set(commands)
    formatter = HelpFormatter("spikedecoder")
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert text, f"{name} {action.option_strings[0]} has no help"
            if action.nargs != 0 and not action.required:
                assert "default" in text, f"{name} {action.option_strings[0]}: help shows no default: {text!r}"
    help_text = commands["generate"].format_help()
    assert "(default: 1.0)" in help_text and "(default: 200)" in help_text
    assert "held-out split" in commands["evaluate"].format_help()


# ---------------------------------------------------------------------------------------------- study
def test_study_does_not_continue_a_checkpoint_trained_with_other_settings(tmp_path: Path, capsys) -> None:
    import dataclasses

    from conftest import PARAGRAPH

    import spikedecoder.study as study
    from spikedecoder.train import train

    toy = ROOT / "configs" / "studies" / "toy.toml"
    data = tmp_path / "text.txt"
    data.write_text(PARAGRAPH * 30)
    out = tmp_path / "study"
    variant = study.plan(study.load_study(toy), str(data))[1]
    run_dir = out / "runs" / variant.name
    other = dataclasses.replace(variant.train, max_steps=2, lr=variant.train.lr / 2)
    train(variant.model, other, run_dir, progress=False)
    before = snapshot(run_dir)
    argv = ["study", str(toy), "--out", str(out), "--data", str(data), "--no-progress", "--only", variant.name]
    fails_with(capsys, argv, f"{run_dir} was trained with other settings (train.lr changed)", "another --out")
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------- resume checks
def training_meta(run: Path) -> dict:
    import json

    return json.loads((run / "checkpoint" / "training.json").read_text())


def test_resume_on_another_text_is_refused_unless_told(run: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("harbour", "harbor") + "Le café était calme.\n")  # the run's characters only
    before = snapshot(run)
    err = fails_with(capsys, train_argv(other, run, "--resume", "--steps", "8"), "another text", "--data-changed ok")
    assert str(data_file) in err and str(other) in err  # both files named, the run's as the fix
    no_data = [a for a in train_argv(data_file, run, "--resume", "--steps", "8") if a not in ("--data", str(data_file))]
    fails_with(capsys, no_data, "the built-in corpus", f"--data {data_file}")
    assert snapshot(run) == before
    # told: the run goes on with its own vocabulary (no id changes meaning) and records the change
    assert main(train_argv(other, run, "--resume", "--steps", "8", "--data-changed", "ok")) == 0
    assert (run / "checkpoint" / "tokenizer.json").read_bytes() == before["checkpoint/tokenizer.json"]
    meta = training_meta(run)
    assert meta["step"] == 8 and meta["data_file"]["path"] == str(other)
    assert meta["changes"][0]["step"] == 6 and meta["changes"][0]["data_file"][0]["path"] == str(data_file)
    # a text with characters the run's vocabulary lacks cannot be trained on, told or not
    alien = tmp_path / "alien.txt"
    alien.write_text(TEXT + "Zebra~\n")
    fails_with(capsys, train_argv(alien, run, "--resume", "--steps", "9", "--data-changed", "ok"), "lacks: 'Z', '~'")


def test_resume_on_a_moved_copy_of_the_text_goes_on(run: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "copy.txt"
    copy.write_bytes(data_file.read_bytes())
    capsys.readouterr()
    assert main(train_argv(copy, run, "--resume", "--steps", "7")) == 0
    assert "same SHA-256" in capsys.readouterr().err
    assert training_meta(run)["data_file"]["path"] == str(copy)


def test_resume_with_other_settings_names_them(run: Path, data_file: Path, capsys) -> None:
    before = snapshot(run)
    argv = train_argv(data_file, run, "--resume", "--steps", "8", "--set", "train.lr=0.005")
    argv += ["--set", "train.batch_size=4"]
    fails_with(capsys, argv, "train.lr: 0.01 -> 0.005", "train.batch_size: 8 -> 4", "--settings-changed ok")
    unk = train_argv(data_file, run, "--resume", "--steps", "8", "--set", "train.unk='?'", "--settings-changed", "ok")
    fails_with(capsys, unk, "another tokenizer (train.unk: None -> '?')", "--force")
    assert snapshot(run) == before
    assert main([*argv, "--settings-changed", "ok"]) == 0
    meta = training_meta(run)
    assert meta["train"]["lr"] == 0.005 and meta["changes"] == [
        {"step": 6, "settings": {"lr": [0.01, 0.005], "batch_size": [8, 4]}}
    ]
    # bookkeeping may change with a note
    capsys.readouterr()
    argv = train_argv(data_file, run, "--resume", "--steps", "9", "--set", "train.lr=0.005")
    assert main([*argv, "--set", "train.batch_size=4", "--set", "train.checkpoint_interval=2"]) == 0
    err = capsys.readouterr().err
    assert "train.max_steps: 8 -> 9" in err and "train.checkpoint_interval: 500 -> 2" in err


def test_resume_with_fewer_steps_than_done_says_there_is_nothing_to_do(run: Path, data_file: Path, capsys) -> None:
    before = snapshot(run)
    fails_with(capsys, train_argv(data_file, run, "--resume", "--steps", "3"), "at step 6, past max_steps=3", "--steps")
    assert snapshot(run) == before
    capsys.readouterr()
    assert main(train_argv(data_file, run, "--resume", "--steps", "6")) == 0
    assert "nothing to train (give --steps above 6 to go on)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- interruptions
def interrupt_at(monkeypatch, step: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    """Training raises `error` when it draws the batch of step `step` (1-based)."""
    real, calls = train_module.get_batch, []

    def get_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", get_batch)


def test_ctrl_c_before_the_first_checkpoint_says_a_command_that_goes_on(
    tmp_path: Path, data_file: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 3)
    capsys.readouterr()
    assert main(train_argv(data_file, out, "--steps", "4")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2; no checkpoint was written yet (checkpoint_interval=500)" in err
    assert "start again with --force" in err and not (out / "checkpoint").exists()
    monkeypatch.undo()
    assert main(train_argv(data_file, out, "--steps", "4", "--force")) == 0  # the command it named
    assert training_meta(out)["step"] == 4 and log_steps(out) == [1, 2, 3, 4]
    # --resume on such a run (a log, no checkpoint) starts it from step 0 too, as compare does
    (out / "checkpoint").rename(tmp_path / "away")
    capsys.readouterr()
    assert main(train_argv(data_file, out, "--steps", "2", "--resume")) == 0
    assert "(its run stopped before the first one): starting it from step 0" in capsys.readouterr().err
    assert training_meta(out)["step"] == 2 and log_steps(out) == [1, 2]


def test_nan_loss_before_the_first_checkpoint_says_a_command_that_goes_on(
    tmp_path: Path, data_file: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    real = train_module.lm_loss
    monkeypatch.setattr(train_module, "lm_loss", lambda logits, y: real(logits, y) * float("nan"))
    err = fails_with(capsys, train_argv(data_file, out, "--steps", "3"), "no checkpoint was written yet")
    assert "start again with --force" in err
    monkeypatch.undo()
    assert main(train_argv(data_file, out, "--steps", "3", "--force", "--set", "train.lr=0.005")) == 0


def test_non_finite_settings_are_refused(tmp_path: Path, data_file: Path, capsys) -> None:
    for item in ("train.lr=inf", "train.grad_clip=inf", "train.weight_decay=nan", "train.min_lr=-inf"):
        fails_with(capsys, train_argv(data_file, tmp_path / "r", "--set", item), f"{item.split('=')[0]}=", "finite")
    fails_with(capsys, train_argv(data_file, tmp_path / "r", "--minutes", "inf"), "--minutes inf", "finite")
    fails_with(capsys, train_argv(data_file, tmp_path / "r", "--set", "train.eval_interval=0"), "train.eval_interval=0")
    assert not (tmp_path / "r").exists()


def log_steps(run: Path) -> list[int]:
    rows = (run / "log.csv").read_text().splitlines()[1:]
    return sorted({int(r.split(",")[0]) for r in rows})


def test_force_then_ctrl_c_before_the_first_checkpoint_keeps_the_old_run_whole(
    run: Path, data_file: Path, capsys, monkeypatch
) -> None:
    before = snapshot(run)
    interrupt_at(monkeypatch, 3)
    capsys.readouterr()
    assert main(train_argv(data_file, run, "--force", "--steps", "20")) == 130
    err = capsys.readouterr().err
    assert f"{run} still holds the previous run, unchanged" in err and "again with --force" in err
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith(".log-")} == before  # log and checkpoint: the old run
    monkeypatch.undo()
    assert main(train_argv(data_file, run, "--resume", "--steps", "8")) == 0  # continues the old run, log and all
    assert log_steps(run) == list(range(1, 9)) and sorted(p.name for p in run.iterdir()) == ["checkpoint", "log.csv"]


def test_a_crash_between_the_checkpoint_and_the_log_swap_is_completed(run: Path, data_file: Path, monkeypatch) -> None:
    import spikedecoder.rundir as rundir_module

    def killed_before_the_log_swap(self) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir_module.Logger, "adopt", killed_before_the_log_swap)
    argv = train_argv(data_file, run, "--force", "--steps", "3", "--set", "train.checkpoint_interval=2")
    assert main(argv) == 130
    assert training_meta(run)["step"] == 2 and log_steps(run) == list(range(1, 7))  # new checkpoint, old log
    monkeypatch.undo()
    assert main(train_argv(data_file, run, "--resume", "--steps", "3")) == 0
    assert log_steps(run) == [1, 2, 3] and sorted(p.name for p in run.iterdir()) == ["checkpoint", "log.csv"]


# ---------------------------------------------------------------------------------------------- one writer
LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_directory_written_by_another_process_is_refused(run: Path, data_file: Path, capsys) -> None:
    import signal

    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        for extra in (["--resume", "--steps", "8"], ["--force", "--steps", "2"]):
            fails_with(capsys, train_argv(data_file, run, *extra), "being written by another training", "--out")
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9 releases the lock: nothing stale is left
        holder.wait()
    assert main(train_argv(data_file, run, "--resume", "--steps", "7")) == 0


def test_the_run_directory_is_locked_while_training_writes_it(tmp_path: Path, data_file: Path, monkeypatch) -> None:
    probe = "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    fcntl.flock(fd, fcntl.LOCK_EX | "
    probe += "fcntl.LOCK_NB)\n    print('free')\nexcept BlockingIOError:\n    print('locked')\n"
    seen: list[str] = []
    real = train_module.lm_loss

    def loss(logits, y):
        seen.append(subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True).stdout)
        return real(logits, y)

    out = tmp_path / "run"
    monkeypatch.setattr(train_module, "lm_loss", loss)
    assert main(train_argv(data_file, out, "--steps", "2")) == 0
    assert [s.strip() for s in seen] == ["locked", "locked"]
    assert subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True).stdout == "free\n"


# ---------------------------------------------------------------------------------------------- one error line
def test_a_batch_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path: Path, data_file: Path, capsys):
    argv = train_argv(data_file, tmp_path / "r", "--set", "train.batch_size=100000000")
    fails_with(capsys, argv, "train.batch_size=100000000", "GiB", "--set train.batch_size")
    assert not (tmp_path / "r").exists()


def test_out_of_memory_during_training_is_one_error_line(tmp_path: Path, data_file: Path, capsys, monkeypatch):
    interrupt_at(monkeypatch, 2, RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9"))
    err = fails_with(capsys, train_argv(data_file, tmp_path / "r", "--steps", "3"), "out of memory at step 1")
    assert "--set train.batch_size" in err


def test_a_checkpoint_with_nan_weights_is_one_error_line(run: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    path = run / "checkpoint" / "model.safetensors"
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 2)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(path))
    for argv in (["generate", str(run), "--prompt", "the"], ["evaluate", str(run)]):
        fails_with(capsys, argv, "NaN or infinite weights", name, "restore")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tokens", "-5"], "--tokens -5: give a number of new tokens >= 0"),
        (["--top-k", "0"], "--top-k 0: give a number of tokens >= 1"),
        (["--top-p", "1.5"], "--top-p 1.5: give a probability in (0, 1]"),
        (["--temperature", "nan"], "--temperature nan: give a finite number >= 0"),
        (["--seed", str(2**70)], f"--seed {2**70}: give an integer between"),
        (["--prompt", "the \udcff lamp"], "--prompt holds a byte that is not valid UTF-8 (b'\\xff' at character 4)"),
        (["--stop", "\udcfe"], "--stop holds a byte that is not valid UTF-8 (b'\\xfe'"),
    ],
)
def test_generate_options_are_named_by_their_flags(trained: Path, capsys, extra: list[str], needle: str) -> None:
    fails_with(capsys, ["generate", str(trained), *extra], needle)


def test_generate_with_a_huge_token_count_streams_instead_of_reserving_it(trained: Path, capsys) -> None:
    from spikedecoder.rundir import load_checkpoint

    _, tokenizer, _ = load_checkpoint(trained)
    stops = [arg for c in tokenizer.chars if c != "\n" for arg in ("--stop", c)]  # any new character stops it
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "the", "--tokens", "100000000000", *stops, "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the") and len(out) < 100 and err == ""


def test_a_data_error_starts_its_own_line_after_the_progress_bar(tmp_path: Path, data_file: Path, capsys) -> None:
    argv = train_argv(data_file, tmp_path / "r", "--set", "model.max_len=4000")
    err = fails_with(capsys, argv, "model.max_len + 1 = 4001", "--set model.max_len")
    assert all(line.startswith("error: ") for line in err.split("\n") if "error:" in line), repr(err)
    assert not (tmp_path / "r").exists()


def test_force_without_a_log_drops_the_old_runs_log_with_its_checkpoint(run: Path, data_file: Path) -> None:
    assert main(train_argv(data_file, run, "--force", "--steps", "2", "--set", "train.log='none'")) == 0
    assert training_meta(run)["step"] == 2 and sorted(p.name for p in run.iterdir()) == ["checkpoint"]
