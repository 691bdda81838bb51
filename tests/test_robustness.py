"""Robust training: a run killed with SIGKILL (mid-step, while writing a checkpoint, between the checkpoint's two
renames, or at a random moment) resumes from its last checkpoint and then logs exactly the losses of an
uninterrupted run; a NaN/inf loss or gradient stops training with a clear message and leaves the last good
checkpoint untouched; a write error (a real EFBIG from RLIMIT_FSIZE, or ENOSPC) never leaves a corrupt or partial
checkpoint behind.

The killed runs are child processes that send SIGKILL to themselves at a chosen point (deterministic), plus one CLI
run killed from outside at whatever moment it has reached. Children run with one intra-op thread, like this suite
(conftest.py), so that their floats are bitwise those of the in-process reference run.
"""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TEXT

import spikedecoder.rundir as rundir_module
import spikedecoder.train as train_module
from spikedecoder import SpikeDecoderConfig
from spikedecoder.checkpoint import CheckpointError, atomic_directory, load_tensors, previous_path
from spikedecoder.data import TokenData
from spikedecoder.optim import TrainingDiverged
from spikedecoder.rundir import load_checkpoint, split_ids_for, validation_ids
from spikedecoder.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(n_layer=1, n_head=2, n_embd=16, max_len=16, encoding="rate", token_code="float")  # rate coding draws
# from the global RNG (on float codes: on binary ones a Bernoulli draw would be deterministic)
TRAIN = dict(
    batch_size=4,
    max_steps=9,
    lr=1e-2,
    min_lr=1e-3,
    warmup_steps=2,
    eval_interval=1000,
    checkpoint_interval=3,
    eval_batches=1,
    eval_batch_size=8,
)

# The child: the same run as `run_reference`, with an optional fault injected at a chosen point.
CHILD = textwrap.dedent(
    """
    import errno, os, pathlib, resource, signal, sys
    import torch
    import spikedecoder.rundir as R
    import spikedecoder.train as T
    from spikedecoder import SpikeDecoderConfig
    from spikedecoder.data import TokenData

    mode, run_dir, text_file = sys.argv[1:4]
    model = SpikeDecoderConfig.from_preset("spikedecoder", **{model})
    tcfg = T.TrainConfig(**{train})
    data = TokenData.from_text(pathlib.Path(text_file).read_text())

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    calls = {{"loss": 0, "save": 0, "rename": 0, "checkpoint": 0}}
    if mode == "mid-step":  # SIGKILL in the forward pass of step 6 (0-based 5), after the checkpoint of step 3
        real_loss = T.lm_loss
        def lm_loss(logits, targets):
            calls["loss"] += 1
            if calls["loss"] == 6:
                die()
            return real_loss(logits, targets)
        T.lm_loss = lm_loss
    elif mode == "in-write":  # SIGKILL half way through model.safetensors of the second checkpoint (step 6)
        real_save = R.save_tensors
        def save_tensors(path, tensors):
            calls["save"] += 1
            if path.name == "model.safetensors" and calls["save"] > 3:
                real_save(path, tensors)
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
                die()
            return real_save(path, tensors)
        R.save_tensors = save_tensors
    elif mode == "between-renames":  # SIGKILL after checkpoint -> .checkpoint.old, before tmp -> checkpoint
        real_rename = pathlib.Path.rename
        def rename(self, target):
            if self.name.startswith(".checkpoint.tmp-"):
                calls["rename"] += 1
                if calls["rename"] == 2:
                    die()
            return real_rename(self, target)
        pathlib.Path.rename = rename
    elif mode == "file-size-limit":  # the second checkpoint meets a real write error: EFBIG above 4 KiB per file
        real_checkpoint = T.save_checkpoint
        def save_checkpoint(*args, **kwargs):
            calls["checkpoint"] += 1
            if calls["checkpoint"] == 2:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write() instead of a killed process
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
            return real_checkpoint(*args, **kwargs)
        T.save_checkpoint = save_checkpoint
    try:
        T.train(model, tcfg, run_dir, progress=False, data=data)
    except T.CheckpointError as exc:
        print("CheckpointError:", exc)
        sys.exit(3)
    """
).format(model=repr(MODEL), train=repr(TRAIN))


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_child(tmp_path: Path, mode: str, run_dir: Path) -> subprocess.CompletedProcess:
    script, text = tmp_path / "child.py", tmp_path / "text.txt"
    script.write_text(CHILD)
    text.write_text(TEXT)
    return subprocess.run(
        [sys.executable, str(script), mode, str(run_dir), str(text)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def data() -> TokenData:
    return TokenData.from_text(TEXT)


def model_cfg() -> SpikeDecoderConfig:
    return SpikeDecoderConfig.from_preset("spikedecoder", **MODEL)


def log_rows(run_dir: Path, key: str = "train/loss") -> list[tuple[int, str]]:
    with open(run_dir / "log.csv", newline="") as fh:
        return [(int(step), value) for step, k, value in list(csv.reader(fh))[1:] if k == key]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data: TokenData) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(model_cfg(), TrainConfig(**TRAIN), run_dir, progress=False, data=data)
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Every step logged once, with the reference's loss, and bitwise the reference's final state."""
    assert log_rows(run_dir) == log_rows(reference)
    assert [s for s, _ in log_rows(run_dir)] == list(range(1, TRAIN["max_steps"] + 1))
    for name in ("model.safetensors", "optimizer.safetensors"):
        got, want = load_tensors(run_dir / "checkpoint" / name), load_tensors(reference / "checkpoint" / name)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)


def checkpoint_step(run_dir: Path) -> int:
    return load_checkpoint(run_dir)[2]["step"]


# ---------------------------------------------------------------------------------------------- kill -9 and resume
def test_kill_9_mid_step_then_resume_gives_the_uninterrupted_losses(tmp_path, data, reference) -> None:
    run_dir = tmp_path / "run"
    proc = run_child(tmp_path, "mid-step", run_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint_step(run_dir) == 3
    assert [s for s, _ in log_rows(run_dir)] == [1, 2, 3, 4, 5]  # steps 4 and 5 were trained, never saved
    train(model_cfg(), TrainConfig(**TRAIN), run_dir, resume=True, progress=False, data=data)
    assert_same_run(run_dir, reference)


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data, reference) -> None:
    run_dir = tmp_path / "run"
    proc = run_child(tmp_path, "in-write", run_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = [p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint.tmp-")]
    assert len(stale) == 1  # the half-written checkpoint: hidden, never read
    assert checkpoint_step(run_dir) == 3  # the previous checkpoint loads, complete
    train(model_cfg(), TrainConfig(**TRAIN), run_dir, resume=True, progress=False, data=data)
    assert_same_run(run_dir, reference)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "log.csv"]  # the next write cleaned up


def test_kill_9_between_the_renames_falls_back_to_the_previous_checkpoint(tmp_path, data, reference) -> None:
    run_dir = tmp_path / "run"
    proc = run_child(tmp_path, "between-renames", run_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (run_dir / "checkpoint").exists() and previous_path(run_dir / "checkpoint").is_dir()
    assert checkpoint_step(run_dir) == 3  # read from .checkpoint.old
    train(model_cfg(), TrainConfig(**TRAIN), run_dir, resume=True, progress=False, data=data)
    assert_same_run(run_dir, reference)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "log.csv"]


def test_cli_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_losses(tmp_path) -> None:
    """`spikedecoder train` killed from outside (SIGKILL) wherever it is, then `--resume`: same losses, same weights."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    sets = [f"model.{k}={v!r}".replace("'", '"') for k, v in MODEL.items()]
    sets += [f"train.{k}={v}" for k, v in TRAIN.items() if k != "max_steps"]
    base = [sys.executable, "-m", "spikedecoder.cli", "train", "--preset", "spikedecoder", "--data", str(text)]
    base += [arg for s in sets for arg in ("--set", s)] + ["--steps", "30"]

    def cli(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*base, "--out", str(out), *extra], env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    assert cli(tmp_path / "straight").wait(timeout=300) == 0
    proc, run_dir = cli(tmp_path / "killed"), tmp_path / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "log.csv").exists() and len(log_rows(run_dir)) >= 14:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert cli(run_dir, "--resume").wait(timeout=300) == 0
    assert log_rows(run_dir) == log_rows(tmp_path / "straight")
    got = load_tensors(run_dir / "checkpoint" / "model.safetensors")
    want = load_tensors(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------- write errors
def test_a_real_write_error_leaves_the_previous_checkpoint_and_no_debris(tmp_path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse the second checkpoint's weights (EFBIG), as a full disk would."""
    run_dir = tmp_path / "run"
    proc = run_child(tmp_path, "file-size-limit", run_dir)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    message = proc.stdout
    assert "could not write the checkpoint of step 6" in message and "File too large" in message
    assert "(step 3) is kept" in message and "--resume" in message
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "log.csv"]
    model, _, meta = load_checkpoint(run_dir)
    assert meta["step"] == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_disk_full_stops_training_with_advice(tmp_path, data, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    tcfg = TrainConfig(**(TRAIN | dict(max_steps=6)))
    train(model_cfg(), TrainConfig(**(TRAIN | dict(max_steps=3))), run_dir, progress=False, data=data)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoint").iterdir()}
    real_save = rundir_module.save_tensors

    def no_space(path: Path, tensors: dict) -> None:
        real_save(path, tensors)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rundir_module, "save_tensors", no_space)
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint of step 6 .*No space left on device"):
        train(model_cfg(), tcfg, run_dir, resume=True, progress=False, data=data)
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoint").iterdir()} == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint", "log.csv"]


def test_a_crash_between_renames_is_repaired_before_the_next_write(tmp_path) -> None:
    """The only complete copy (.old) must never be deleted by the next write, even if that write fails."""
    target = tmp_path / "ckpt"
    atomic_directory(target, lambda tmp: (tmp / "x").write_text("first"))
    target.rename(previous_path(target))  # the state a kill between the renames leaves

    def failing(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_directory(target, failing)
    assert (target / "x").read_text() == "first" and not previous_path(target).exists()
    atomic_directory(target, lambda tmp: (tmp / "x").write_text("second"))
    assert (target / "x").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------------------------- divergence
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint_bitwise(tmp_path, data, monkeypatch):
    run_dir = tmp_path / "run"
    real_loss, calls = train_module.lm_loss, []

    def nan_at_step_8(logits, targets):
        calls.append(1)
        loss = real_loss(logits, targets)
        return loss * float("nan") if len(calls) == 8 else loss

    train(model_cfg(), TrainConfig(**(TRAIN | dict(max_steps=6))), run_dir, progress=False, data=data)
    saved = {p.name: p.read_bytes() for p in (run_dir / "checkpoint").iterdir()}
    monkeypatch.setattr(train_module, "lm_loss", nan_at_step_8)
    calls.extend([1] * 6)  # the resumed run starts at step 6: its second loss is step 8's
    with pytest.raises(TrainingDiverged) as info:
        train(model_cfg(), TrainConfig(**TRAIN), run_dir, resume=True, progress=False, data=data)
    message = str(info.value)
    assert message.startswith("loss became nan at step 7;")
    assert f"the last good checkpoint in {run_dir / 'checkpoint'} (step 6) is kept" in message
    assert "Lower lr" in message and "--resume" in message
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoint").iterdir()} == saved
    assert max(s for s, _ in log_rows(run_dir)) == 7  # step 7 is logged; step 8 never ran


def test_infinite_gradient_with_a_finite_loss_stops_before_the_weights_change(tmp_path, data, monkeypatch):
    """sqrt at 0 has a finite value and an infinite slope: the loss looks fine, the update would be NaN."""
    real_loss, calls = train_module.lm_loss, []

    def bad_slope_at_step_5(logits, targets):
        calls.append(1)
        loss = real_loss(logits, targets)
        return loss + torch.sqrt(logits.sum() * 0) if len(calls) == 5 else loss

    monkeypatch.setattr(train_module, "lm_loss", bad_slope_at_step_5)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan at step 4 \(loss [0-9.]+\); the last good"):
        train(model_cfg(), TrainConfig(**TRAIN), tmp_path, progress=False, data=data)
    model, _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_before_any_checkpoint_says_so(tmp_path, data, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "lm_loss", lambda logits, targets: logits.sum() * float("inf"))
    with pytest.raises(TrainingDiverged, match=r"at step 0; no checkpoint was written yet \(checkpoint_interval=3\)"):
        train(model_cfg(), TrainConfig(**TRAIN), tmp_path, progress=False, data=data)
    assert not (tmp_path / "checkpoint").exists()


# ---------------------------------------------------------------------------------------------- splits of a run
def test_split_ids_for_rebuilds_the_runs_splits(tmp_path, data) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cfg = TrainConfig(**(TRAIN | dict(max_steps=1, data=str(text))))
    train(model_cfg(), cfg, tmp_path / "run", progress=False)
    _, tokenizer, meta = load_checkpoint(tmp_path / "run")
    for split, ids in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert torch.equal(split_ids_for(meta, tokenizer, split), ids), split
    assert torch.equal(validation_ids(meta, tokenizer), data.val)
    with pytest.raises(ValueError, match="split='dev': choose one of train, val, test"):
        split_ids_for(meta, tokenizer, "dev")


def test_fresh_run_in_an_old_directory_starts_a_new_log(tmp_path, data) -> None:
    train(model_cfg(), TrainConfig(**(TRAIN | dict(max_steps=4))), tmp_path, progress=False, data=data)
    train(model_cfg(), TrainConfig(**(TRAIN | dict(max_steps=2))), tmp_path, progress=False, data=data)
    assert [s for s, _ in log_rows(tmp_path)] == [1, 2]
