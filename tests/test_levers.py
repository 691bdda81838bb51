"""Training levers: the firing-rate regulariser (its hinge, its effect, the rates it logs equal the energy counter's)
and distillation from a trained teacher (the loss against the hand formula, refused teachers, compare training the
teacher first, exact resume, the recorded cost). The learned membrane decay is tested with the neurons."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import PARAGRAPH, TEXT, tiny_config

import spikedecoder.train as train_module
from spikedecoder import ConfigError, neurons
from spikedecoder.checkpoint import load_tensors
from spikedecoder.cli import main
from spikedecoder.data import TokenData, eval_batches
from spikedecoder.distill import soft_loss
from spikedecoder.energy import count_ops
from spikedecoder.model import SpikeDecoder
from spikedecoder.rates import layer_targets, rate_penalty
from spikedecoder.rundir import load_checkpoint, read_history
from spikedecoder.settings import TrainConfig
from spikedecoder.train import train


@pytest.fixture(scope="module")
def data() -> TokenData:
    return TokenData.from_text(TEXT)


def tiny(preset: str = "spikedecoder", **overrides):
    return tiny_config(preset, **(dict(n_layer=1, max_len=24) | overrides))


def quick(**overrides) -> TrainConfig:
    values = dict(
        batch_size=8,
        max_steps=20,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        eval_interval=1000,
        checkpoint_interval=1000,
        eval_batches=1,
        eval_batch_size=8,
    )
    return TrainConfig(**(values | overrides))


def log(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """log.csv as {key: [(step, value), ...]}."""
    rows: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "log.csv", newline="") as fh:
        for step, key, value in list(csv.reader(fh))[1:]:
            rows.setdefault(key, []).append((int(step), float(value)))
    return rows


# ---------------------------------------------------------------------------------------------- the regulariser
def test_rate_penalty_is_a_squared_hinge_above_the_target() -> None:
    """Layer a fires at 0.3 against a target 0.1: it pays 0.2^2 and gets the gradient 2 * 0.2 / 2 layers per
    spike rate; layer b fires at 0.05, below its target: it pays nothing and gets no push (one-sided)."""
    spikes = {"a": torch.tensor(30.0, requires_grad=True), "b": torch.tensor(5.0, requires_grad=True)}
    updates = {"a": 100, "b": 100}
    penalty, summary = rate_penalty(spikes, updates, {"a": 0.1, "b": 0.1})
    assert penalty.item() == pytest.approx(0.2**2 / 2)
    penalty.backward()
    assert spikes["a"].grad.item() == pytest.approx(2 * 0.2 / 2 / 100)
    assert spikes["b"].grad.item() == 0.0
    assert summary == pytest.approx({"firing_rate": 35 / 200, "a": 0.3, "b": 0.05})


def test_rate_targets_per_layer_by_pattern() -> None:
    names = ["blocks.0.attn.q_lif", "blocks.0.mlp.in_lif", "blocks.0.mlp.hidden_lif", "head.lif"]
    assert layer_targets(names, 0.05) == dict.fromkeys(names, 0.05)
    table = {"blocks.*.mlp.hidden_lif": 0.02, "blocks.*.mlp.*": 0.1, "head.*": 0.3}
    assert layer_targets(names, table) == {  # the first pattern that matches wins; q_lif is left alone
        "blocks.0.mlp.hidden_lif": 0.02,
        "blocks.0.mlp.in_lif": 0.1,
        "head.lif": 0.3,
    }
    with pytest.raises(ConfigError, match=r"pattern 'block.\*' matches no LIF layer.*its LIF layers are blocks.0"):
        layer_targets(names, {"block.*": 0.1})


def test_the_regulariser_lowers_the_firing_rate(tmp_path: Path, data: TokenData) -> None:
    """Same model, seed and batches; a strong weight with a low target fires measurably less than weight 0, and
    only the regularised run logs its training rates and penalty."""
    plain = train(tiny(), quick(), tmp_path / "plain", progress=False, data=data)
    sparse = train(tiny(), quick(rate_weight=10.0, rate_target=0.02), tmp_path / "sparse", progress=False, data=data)
    assert sparse["firing_rate"] < 0.7 * plain["firing_rate"], (plain["firing_rate"], sparse["firing_rate"])
    logged = log(tmp_path / "sparse")
    assert logged["val/firing_rate"][-1] == (20, pytest.approx(sparse["firing_rate"], rel=1e-5))
    rates = [v for _, v in logged["train/firing_rate"]]
    assert len(rates) == 20 and rates[-1] < rates[0]
    assert all(v > 0 for _, v in logged["train/rate_penalty"])
    assert "train/firing_rate" not in log(tmp_path / "plain")
    assert read_history(tmp_path / "sparse")[-1]["firing_rate"] == pytest.approx(sparse["firing_rate"])


@pytest.mark.parametrize("overrides", [{}, dict(spike_levels=2, bipolar=True, learnable_tau="channel")])
def test_logged_rates_equal_the_energy_counters(tmp_path: Path, data: TokenData, overrides: dict) -> None:
    """The rates logged at an evaluation are count_ops' firing rates of the same model on the same batch, per LIF
    layer and in the mean over all neurons (graded, bipolar spikes count their magnitude in both)."""
    train(tiny(**overrides), quick(max_steps=6), tmp_path, progress=False, data=data)
    model, _, _ = load_checkpoint(tmp_path)
    x, _ = next(iter(eval_batches(data.val, model.config.max_len, 8)))  # evaluate()'s one batch (eval_batches=1)
    ops = count_ops(model, x)
    logged = {key[len("rate/") :]: v[-1][1] for key, v in log(tmp_path).items() if key.startswith("rate/")}
    counted = ops.firing_rates()
    assert logged.keys() == counted.keys() and len(counted) >= 6
    assert logged == pytest.approx(counted, rel=1e-5, abs=1e-7)
    spikes, updates = (sum(v[i] for v in ops.firing.values()) for i in (0, 1))
    assert log(tmp_path)["val/firing_rate"][-1][1] == pytest.approx(spikes / updates, rel=1e-5)
    if overrides:  # graded and bipolar: the batch really holds counts above 1 and negative spikes
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in lifs(model)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        assert max(float(o.max()) for o in seen) > 1 and min(float(o.min()) for o in seen) < 0


def lifs(model: torch.nn.Module) -> list[torch.nn.Module]:
    from spikedecoder.neurons import LIF

    return [m for m in model.modules() if isinstance(m, LIF)]


def test_a_model_without_lif_layers_logs_no_rates(tmp_path: Path, data: TokenData) -> None:
    """The ANN in a compare whose shared settings regularise the rates: nothing to regularise, nothing logged."""
    result = train(tiny("ann"), quick(max_steps=3, rate_weight=1.0), tmp_path, progress=False, data=data)
    assert "firing_rate" not in result and not any("rate" in key for key in log(tmp_path) if key != "train/lr")


# ---------------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data: TokenData) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "ann"
    train(tiny("ann", max_len=32), quick(max_steps=15), out, progress=False, data=data)
    return out


def test_soft_loss_is_the_tempered_kl_divergence() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    tau = 2.5
    p = torch.softmax(teacher / tau, -1)
    kl = (p * (torch.log(p) - torch.log(torch.softmax(student / tau, -1)))).sum(-1).mean()
    torch.testing.assert_close(soft_loss(student, teacher, tau), tau**2 * kl)
    assert soft_loss(teacher, teacher, tau).abs() < 1e-6


def test_distilled_loss_equals_the_hand_formula(tmp_path: Path, data: TokenData, teacher: Path) -> None:
    """Step 1's logged loss is (1 - a) CE + a tau^2 KL(teacher || student) of the initial student on the first
    batch, written out with softmax and log here."""
    cfg = quick(max_steps=1, distill=str(teacher), distill_weight=0.3, distill_temperature=2.0)
    result = train(tiny(), cfg, tmp_path, progress=False, data=data)
    torch.manual_seed(cfg.seed)
    student = SpikeDecoder(tiny().replace(vocab_size=data.vocab_size)).train()
    x, y = train_module.get_batch(data.train, 8, 24, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        s, t = student(x), load_checkpoint(teacher)[0](x)
        ce = -torch.log_softmax(s, -1).gather(-1, y[..., None]).mean()
        p = torch.softmax(t / 2.0, -1)
        kl = (p * (torch.log(p) - torch.log_softmax(s / 2.0, -1))).sum(-1).mean()
    logged = log(tmp_path)
    assert logged["train/ce"][0][1] == pytest.approx(ce.item(), rel=1e-5)
    assert logged["train/soft"][0][1] == pytest.approx(4.0 * kl.item(), rel=1e-5)
    assert logged["train/loss"][0][1] == pytest.approx(0.7 * ce.item() + 0.3 * 4.0 * kl.item(), rel=1e-5)
    facts = result["distill"]
    assert facts["teacher"] == str(teacher.resolve()) and facts["teacher_preset"] == "ann"
    assert facts["teacher_train_seconds"] == load_checkpoint(teacher)[2]["train_seconds"] > 0
    assert facts["teacher_forward_steps"] == 1 and facts["teacher_forward_seconds_per_step"] > 0
    assert json.loads((tmp_path / "checkpoint" / "training.json").read_text())["distill"] == facts


def test_teachers_that_cannot_teach_are_refused_before_anything_is_written(
    tmp_path: Path, data: TokenData, teacher: Path
) -> None:
    other = TokenData.from_text(TEXT + "Zebras quizzed jovial kings!\n" * 20)  # more characters: another vocabulary
    with pytest.raises(ConfigError, match=r"train.distill=.*the teacher's vocabulary .* is not the student's"):
        train(tiny(), quick(distill=str(teacher)), tmp_path / "a", progress=False, data=other)
    with pytest.raises(ConfigError, match=r"teacher reads at most 32 tokens.*model.max_len=48"):
        train(tiny(max_len=48), quick(distill=str(teacher)), tmp_path / "b", progress=False, data=data)
    with pytest.raises(ConfigError, match=r"train.distill='.*nowhere': no trained run there"):
        train(tiny(), quick(distill=str(tmp_path / "nowhere")), tmp_path / "c", progress=False, data=data)
    with pytest.raises(ConfigError, match=r"is this run itself"):
        train(tiny("ann", max_len=32), quick(distill=str(teacher)), teacher, resume=True, progress=False, data=data,
              allow_settings_change=True)  # fmt: skip
    assert load_checkpoint(teacher)[2]["step"] == 15
    assert not any((tmp_path / name).exists() for name in "abc")


def test_distilled_run_resumes_exactly(tmp_path: Path, data: TokenData, teacher: Path, monkeypatch) -> None:
    """6 steps in one go == 3 steps, an interruption, then resume to 6; the teacher's forward time adds up."""
    cfg = quick(max_steps=6, checkpoint_interval=3, distill=str(teacher), distill_weight=0.5, distill_temperature=2.0)
    train(tiny(), cfg, tmp_path / "straight", progress=False, data=data)
    real_get_batch, calls = train_module.get_batch, []

    def interrupt_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_get_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), cfg, tmp_path / "resumed", progress=False, data=data)
    monkeypatch.setattr(train_module, "get_batch", real_get_batch)
    assert load_checkpoint(tmp_path / "resumed")[2]["distill"]["teacher_forward_steps"] == 3
    result = train(tiny(), cfg, tmp_path / "resumed", resume=True, progress=False, data=data)
    straight = load_tensors(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    resumed = load_tensors(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert result["distill"]["teacher_forward_steps"] == 6
    with pytest.raises(ConfigError, match=r"train.distill_weight: 0.5 -> 0.8"):  # a changed lever is a change
        train(tiny(), quick(**{**cfg.__dict__, "max_steps": 8, "distill_weight": 0.8}), tmp_path / "resumed",
              resume=True, progress=False, data=data)  # fmt: skip


@pytest.mark.parametrize("backend", ["loop", "fused"])
def test_every_lever_together_under_bf16_autocast(
    tmp_path: Path, data: TokenData, teacher: Path, backend: str, monkeypatch
) -> None:
    """The mixed-precision path a GPU takes: learned decays, the regulariser and a teacher at once still learn (the
    fused LIF's equations run eagerly here; test_neurons compiles them)."""
    monkeypatch.setattr(neurons, "_kernels", {"forward": neurons.lif_forward, "backward": neurons.lif_backward})
    cfg = quick(max_steps=12, precision="bf16", rate_weight=1.0, rate_target=0.05, distill=str(teacher))
    model = tiny(learnable_tau="channel", lif_backend=backend)
    result = train(model, cfg, tmp_path, progress=False, data=data)
    losses = [v for _, v in log(tmp_path)["train/loss"]]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < sum(losses[:3])
    assert 0 < result["firing_rate"] < 1 and result["distill"]["teacher_forward_steps"] == 12
    decays = [p for n, p in load_checkpoint(tmp_path)[0].named_parameters() if n.endswith("decay_logit")]
    assert decays and any(bool((p != 0).any()) for p in decays)  # the decays moved off their start, 1/tau = 1/2


# ---------------------------------------------------------------------------------------------- compare
COMPARE_TINY = [
    "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set", "model.max_len=24",
    "--set", "train.batch_size=8", "--set", "train.eval_batches=1", "--set", "train.lr=1e-2",
    "--set", 'compare.prompt="the "',
]  # fmt: skip


def test_compare_trains_the_teacher_first_and_reports_its_cost(tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Night {i}: {PARAGRAPH}" for i in range(20)))
    out = tmp_path / "cmp"
    argv = ["compare", "--presets", "spikedecoder", "ann", *COMPARE_TINY, "--set", "train.distill=ann"]
    argv += ["--set", "train.distill_weight=0.7", "--steps", "4", "--data", str(text), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.index("=== training ann ===") < printed.index("=== training spikedecoder === (distilled from ann)")
    assert "spikedecoder learnt from ann" in printed and "the teacher trained" in printed
    ann, snn = (load_checkpoint(out / name)[2] for name in ("ann", "spikedecoder"))
    assert "distill" not in ann and ann["train"]["distill"] is None and ann["train"]["distill_weight"] == 0.5
    assert snn["train"]["distill"] == "ann" and snn["distill"]["teacher"] == str((out / "ann").resolve())
    assert snn["distill"]["teacher_train_seconds"] == pytest.approx(ann["train_seconds"])
    results = json.loads((out / "results.json").read_text())
    assert results["spikedecoder"]["distill"]["weight"] == 0.7 and "distill" not in results["ann"]
    # a rerun with --resume finds both runs as they were started (the teacher without distillation)
    assert main([*argv, "--resume", "--steps", "5"]) == 0
    assert load_checkpoint(out / "spikedecoder")[2]["distill"]["teacher_forward_steps"] == 5


def test_compare_refuses_a_teacher_it_does_not_train(tmp_path: Path, capsys) -> None:
    for distill, needle in [("ann", "names a preset this compare does not train"), ("x/y", "no such run directory")]:
        capsys.readouterr()
        code = main(["compare", "--presets", "spikedecoder", "--set", f"train.distill={distill}", "--out",
                     str(tmp_path / "cmp")])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(rate_weight=-1.0), "train.rate_weight=-1: must be >= 0"),
        (dict(rate_target=0.1), r"train.rate_target=0.1 does nothing with rate_weight=0"),
        (dict(rate_weight=1.0, rate_target=-0.1), "train.rate_target=-0.1: targets are spikes per neuron"),
        (dict(rate_weight=1.0, rate_target={}), r"train.rate_target=\{\}: give a number, or a table"),
        (dict(distill_weight=0.7), "do nothing without a teacher: set train.distill"),
        (dict(distill="runs/ann", distill_weight=1.5), r"train.distill_weight=1.5: must be in \[0, 1\]"),
        (dict(distill="runs/ann", distill_temperature=0.0), "train.distill_temperature=0: must be > 0"),
        (dict(distill=" "), "train.distill=' ': give the teacher's run directory"),
        (dict(rate_weight=math.inf), "train.rate_weight=inf: give a finite number"),
    ],
)
def test_bad_lever_settings(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)
