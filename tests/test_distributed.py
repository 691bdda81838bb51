"""Distributed data parallel: `torchrun --nproc_per_node=2 spikedecoder train` (gloo on the CPU) takes the same steps as
one process with the doubled batch; rank 0 alone writes the log and the checkpoint, which keeps every rank's random
state; evaluation is split over the ranks and summed; a killed 2-rank run resumes to the same losses."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TEXT

from spikedecoder import ConfigError, SpikeDecoderConfig
from spikedecoder.checkpoint import load_tensors
from spikedecoder.data import TokenData
from spikedecoder.rundir import read_history
from spikedecoder.runtime import Runtime, evaluate, setup_runtime
from spikedecoder.train import TrainConfig, rank_batch, train

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(n_layer=1, n_head=2, n_embd=16, max_len=16)
TRAIN = dict(
    batch_size=4,  # per rank: 2 ranks x 4 == one process x 8
    lr=1e-2,
    min_lr=1e-3,
    warmup_steps=2,
    eval_interval=1000,
    checkpoint_interval=2,
    eval_batches=3,  # an odd count: rank 0 evaluates two batches, rank 1 one
    eval_batch_size=4,
)
STEPS = 5


def torchrun(out: Path, text: Path, steps: int, *extra: str, **popen) -> subprocess.Popen:
    sets = [f"model.{k}={v}" for k, v in MODEL.items()] + [f"train.{k}={v}" for k, v in TRAIN.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "spikedecoder.cli", "train", "--preset", "spikedecoder", "--data", str(text), "--out", str(out)]
    cmd += [arg for s in sets for arg in ("--set", s)] + ["--steps", str(steps), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def log_rows(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    with open(run_dir / "log.csv", newline="") as fh:
        return [(int(step), float(value)) for step, k, value in list(csv.reader(fh))[1:] if k == key]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, text: Path) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(out, text, STEPS)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert output.count('"bits_per_char"') == 1, "the final metrics are printed once, by rank 0, not once per rank"
    return out


def test_rank_batches_partition_the_single_process_batch() -> None:
    ids = torch.arange(1000)
    whole = rank_batch(ids, 8, 16, torch.Generator().manual_seed(0), Runtime(torch.device("cpu")))
    parts = [
        rank_batch(ids, 4, 16, torch.Generator().manual_seed(0), Runtime(torch.device("cpu"), rank=r, world=2))
        for r in range(2)
    ]
    for i in range(2):  # x, then y
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])


def test_two_ranks_equal_one_process_with_the_doubled_batch(two_ranks: Path, text: Path, tmp_path: Path) -> None:
    model_cfg = SpikeDecoderConfig.from_preset("spikedecoder", **MODEL)
    single = tmp_path / "single"
    tcfg = TrainConfig(**(TRAIN | dict(batch_size=8, max_steps=STEPS, data=str(text))))
    train(model_cfg, tcfg, single, progress=False)

    got = load_tensors(two_ranks / "checkpoint" / "model.safetensors")
    want = load_tensors(single / "checkpoint" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-5), (key, (got[key] - want[key]).abs().max())
    # rank 0 alone logs: every step once, with the mean loss over both ranks
    ddp_losses, single_losses = log_rows(two_ranks), log_rows(single)
    assert [s for s, _ in ddp_losses] == list(range(1, STEPS + 1))
    assert [v for _, v in ddp_losses] == pytest.approx([v for _, v in single_losses], rel=1e-5)
    # evaluation split over the ranks covers the same batches as one process
    (ddp_val,), (single_val,) = read_history(two_ranks), read_history(single)
    assert ddp_val["tokens"] == single_val["tokens"] > 2 * 4 * MODEL["max_len"]
    assert ddp_val["loss"] == pytest.approx(single_val["loss"], rel=1e-5)


def test_two_ranks_with_the_levers_equal_one_process_with_the_doubled_batch(text: Path, tmp_path: Path) -> None:
    """The firing-rate regulariser (on the global batch's rates) and distillation (each rank's teacher on its own
    share) take the same steps on 2 ranks as in one process with the doubled batch."""
    teacher = tmp_path / "teacher"
    ann = SpikeDecoderConfig.from_preset("ann", **MODEL)
    train(ann, TrainConfig(**(TRAIN | dict(max_steps=2, data=str(text)))), teacher, progress=False)
    levers = dict(rate_weight=5.0, rate_target=0.05, distill=str(teacher), distill_weight=0.5, distill_temperature=2.0)
    sets = [arg for k, v in levers.items() for arg in ("--set", f"train.{k}={v}")]
    out = tmp_path / "ddp"
    output, _ = torchrun(out, text, 4, *sets).communicate(timeout=300)
    single = tmp_path / "single"
    tcfg = TrainConfig(**(TRAIN | levers | dict(batch_size=8, max_steps=4, data=str(text))))
    train(SpikeDecoderConfig.from_preset("spikedecoder", **MODEL), tcfg, single, progress=False)
    got = load_tensors(out / "checkpoint" / "model.safetensors")
    want = load_tensors(single / "checkpoint" / "model.safetensors")
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-5), (key, (got[key] - want[key]).abs().max())
    for key in ("train/loss", "train/rate_penalty", "train/firing_rate", "train/soft"):
        ddp, one = [float(v) for _, v in log_rows(out, key)], [float(v) for _, v in log_rows(single, key)]
        assert len(ddp) == 4 and ddp == pytest.approx(one, rel=1e-4), key
    assert float(log_rows(single, "train/rate_penalty")[0][1]) > 0  # the regulariser acts, or the test is void


def test_rank_0_writes_one_checkpoint_with_every_ranks_random_state(two_ranks: Path) -> None:
    assert sorted(p.name for p in two_ranks.iterdir()) == ["checkpoint", "log.csv"]
    rng = load_tensors(two_ranks / "checkpoint" / "rng.safetensors")
    assert {"torch", "torch.rank1", "batches"} <= rng.keys()
    assert not torch.equal(rng["torch"], rng["torch.rank1"])  # ranks draw their own dropout / rate-code spikes


def test_evaluate_alone_is_unchanged_by_the_runtime_argument() -> None:
    data = TokenData.from_text(TEXT)
    from spikedecoder.model import SpikeDecoder

    model = SpikeDecoder(SpikeDecoderConfig.from_preset("ann", **MODEL, vocab_size=data.vocab_size))
    plain = evaluate(model, data.val, "char", batch_size=4)
    explicit = evaluate(model, data.val, "char", batch_size=4, runtime=Runtime(torch.device("cpu")))
    assert plain == explicit


# ---------------------------------------------------------------------------------------------- device and precision
def test_a_plain_process_trains_alone_in_fp32_on_the_cpu(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = setup_runtime(TrainConfig())
    assert (rt.device, rt.amp_dtype, rt.rank, rt.world, rt.owns_group) == (torch.device("cpu"), None, 0, 1, False)
    assert setup_runtime(TrainConfig(precision="bf16")).amp_dtype == torch.bfloat16


def test_bf16_on_a_cpu_without_native_bf16_warns_and_still_trains_in_bf16(monkeypatch) -> None:
    import spikedecoder.runtime as runtime

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16 matmuls .* set train.precision = 'fp32'"):
        assert setup_runtime(TrainConfig(precision="bf16")).amp_dtype == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert setup_runtime(TrainConfig(precision="bf16")).amp_dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_asking_for_a_gpu_without_one_says_what_to_do() -> None:
    with pytest.raises(
        ConfigError, match="train.device='cuda' but no CUDA GPU is visible to torch; use train.device='cpu'"
    ):
        setup_runtime(TrainConfig(device="cuda"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(device="gpu"), "device='gpu': choose cpu, cuda, cuda:N or auto"),
        (dict(precision="fp16"), "precision='fp16': choose auto, fp32 or bf16"),
    ],
)
def test_bad_device_or_precision(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


@pytest.mark.parametrize("preset", ["ann", "spikedecoder"])
def test_bf16_autocast_trains(tmp_path: Path, preset: str) -> None:
    """The mixed-precision path a GPU takes by default, run here through CPU autocast."""
    data = TokenData.from_text(TEXT)
    tcfg = TrainConfig(**(TRAIN | dict(max_steps=12, precision="bf16")))
    result = train(SpikeDecoderConfig.from_preset(preset, **MODEL), tcfg, tmp_path, progress=False, data=data)
    losses = [v for _, v in log_rows(tmp_path)]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]) and result["val"]["loss"] < losses[0]


@pytest.mark.slow
def test_killed_two_rank_run_resumes_to_the_same_losses(text: Path, tmp_path: Path) -> None:
    """SIGKILL to both workers and torchrun mid-run, then a 2-rank --resume: the uninterrupted run's losses."""
    steps, straight, out = 30, tmp_path / "straight", tmp_path / "run"
    output, _ = torchrun(straight, text, steps).communicate(timeout=300)
    proc = torchrun(out, text, steps)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.csv").exists() and len(log_rows(out)) >= 7:
            break
        time.sleep(0.02)
    for pid in [*children(proc.pid), proc.pid]:  # the workers (torchrun gives each its own session), then torchrun
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    assert log_rows(out)[-1][0] < steps, "the run finished before it could be killed"
    resumed = torchrun(out, text, steps, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert log_rows(out) == log_rows(straight)
    got = load_tensors(out / "checkpoint" / "model.safetensors")
    want = load_tensors(straight / "checkpoint" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
