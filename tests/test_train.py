"""Training: every preset of the ladder learns, exact resume, divergence handling, the schedule, weight-decay groups,
whole-split evaluation and clear errors for bad training options."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TEXT, tiny_config

import spikedecoder.train as train_module
from spikedecoder import ConfigError, SpikeDecoderConfig
from spikedecoder.checkpoint import CheckpointError, load_tensors
from spikedecoder.data import TokenData
from spikedecoder.model import SpikeDecoder
from spikedecoder.optim import TrainingDiverged, learning_rate, param_groups
from spikedecoder.rundir import load_checkpoint, read_history
from spikedecoder.runtime import evaluate
from spikedecoder.train import TrainConfig, train


@pytest.fixture(scope="module")
def data() -> TokenData:
    return TokenData.from_text(TEXT)


def tiny(preset: str = "spikedecoder", **overrides) -> SpikeDecoderConfig:
    return tiny_config(preset, **(dict(n_layer=1, max_len=24) | overrides))


def quick(**overrides) -> TrainConfig:
    """50 steps of batch 8 at lr 1e-2: a few seconds per preset; one evaluation and one checkpoint, at the end."""
    values = dict(
        batch_size=8,
        max_steps=50,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=5,
        eval_interval=1000,
        checkpoint_interval=1000,
        eval_batches=2,
        eval_batch_size=8,
    )
    return TrainConfig(**(values | overrides))


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "log.csv", newline="") as fh:
        return [float(value) for _, key, value in list(csv.reader(fh))[1:] if key == "train/loss"]


# ---------------------------------------------------------------------------------------------- every preset learns
@pytest.mark.parametrize("preset", ["ann", "spiking-attention", "spiking-attention-mlp", "spikedecoder"])
def test_each_preset_learns(tmp_path: Path, data: TokenData, preset: str) -> None:
    result = train(tiny(preset), quick(), tmp_path, progress=False, data=data)
    losses = train_losses(tmp_path)
    assert len(losses) == 50 and result["step"] == 50
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"{preset}: loss {first:.3f} -> {last:.3f}"
    # the model also beats the uniform guess on held-out text
    assert result["val"]["loss"] < torch.log(torch.tensor(float(data.vocab_size))).item() - 0.3
    model, tokenizer, meta = load_checkpoint(tmp_path)
    assert model.config.preset == preset and tokenizer.vocab_size == data.vocab_size and meta["step"] == 50


# ---------------------------------------------------------------------------------------------- resume and divergence
def test_resume_continues_exactly(tmp_path: Path, data: TokenData, monkeypatch) -> None:
    """6 steps in one go == 3 steps, an interruption, then --resume to 6 (weights, optimizer and RNG restored)."""
    cfg = tiny(n_embd=16, max_len=16, encoding="rate", token_code="float")  # rate coding draws from the global RNG
    tcfg = quick(batch_size=4, max_steps=6, warmup_steps=2, checkpoint_interval=3, eval_batches=1)
    train(cfg, tcfg, tmp_path / "straight", progress=False, data=data)

    real_get_batch, calls = train_module.get_batch, []

    def interrupt_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_get_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tcfg, tmp_path / "resumed", progress=False, data=data)
    monkeypatch.setattr(train_module, "get_batch", real_get_batch)
    assert load_checkpoint(tmp_path / "resumed")[2]["step"] == 3
    train(cfg, tcfg, tmp_path / "resumed", resume=True, progress=False, data=data)

    straight = load_tensors(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    resumed = load_tensors(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [h["step"] for h in read_history(tmp_path / "resumed")] == [6]


def test_resume_refuses_a_different_model(tmp_path: Path, data: TokenData) -> None:
    tcfg = quick(batch_size=4, max_steps=2, eval_batches=1)
    train(tiny(n_embd=16, max_len=16), tcfg, tmp_path, progress=False, data=data)
    with pytest.raises(CheckpointError, match=r"different model config \(n_embd: 16 -> 32\).*--force or a new --out"):
        train(tiny(n_embd=32, max_len=16), tcfg, tmp_path, resume=True, progress=False, data=data)
    # a checkpoint from an older version lacks fields added since: they behaved as their defaults, so one left at
    # its default resumes, and one set otherwise now is named with the default it had
    config = tmp_path / "checkpoint" / "config.json"
    saved = json.loads(config.read_text())
    del saved["mlp_conv"], saved["float_stages"]
    config.write_text(json.dumps(saved))
    train(tiny(n_embd=16, max_len=16), dataclasses.replace(tcfg, max_steps=3), tmp_path, resume=True, data=data)
    saved = json.loads(config.read_text())
    del saved["attn_power"]
    config.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"attn_power: 1 -> 2\b"):
        train(tiny(n_embd=16, max_len=16), dataclasses.replace(tcfg, max_steps=4), tmp_path, resume=True, data=data)


def test_divergence_stops_with_advice_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, data: TokenData, monkeypatch
) -> None:
    real_loss, calls = train_module.lm_loss, []

    def nan_at_step_5(logits, targets):
        calls.append(1)
        loss = real_loss(logits, targets)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_module, "lm_loss", nan_at_step_5)
    tcfg = quick(batch_size=4, max_steps=10, checkpoint_interval=2, eval_batches=1)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4; the last good checkpoint .* Lower lr"):
        train(tiny(n_embd=16, max_len=16), tcfg, tmp_path, progress=False, data=data)
    model, _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- pieces
def test_learning_rate_warms_up_then_decays_to_min_lr() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(10, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx(5.5e-4)  # half way through the cosine
    assert learning_rate(110, cfg) == pytest.approx(1e-4)
    rates = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_weight_decay_only_on_linear_matrices() -> None:
    model = SpikeDecoder(tiny(norm="batch", learnable_threshold="channel", learnable_tau="channel", n_layer=2))
    decay, no_decay = (g["params"] for g in param_groups(model, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    kept = {names[id(p)] for p in no_decay}
    assert decayed and all(n.endswith("linear.weight") or n == "head.out.weight" for n in decayed)
    assert any("threshold" in n for n in kept) and any(".table." in n for n in kept)
    assert any(n.endswith("decay_logit") for n in kept)
    assert any("norm" in n for n in kept) and any(n.endswith("bias") for n in kept)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_evaluate_covers_the_whole_split_and_restores_the_mode(data: TokenData) -> None:
    model = SpikeDecoder(tiny(vocab_size=data.vocab_size)).train()
    metrics = evaluate(model, data.val, "char", batch_size=3)
    assert metrics["tokens"] == len(data.val) - 1
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / torch.log(torch.tensor(2.0)).item())
    assert model.training
    assert "perplexity" in evaluate(model, data.val, "token", batch_size=3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(tokenizer="sentencepiece"), "tokenizer='sentencepiece': choose char, bpe or word"),
        (dict(batch_size=0), "train.batch_size=0: must be >= 1"),
        (dict(max_steps=0), "train.max_steps=0: must be >= 1"),
        (dict(lr=0.0), "need lr > 0 and 0 <= min_lr <= lr"),
        (dict(lr=1e-3, min_lr=1e-2), "need lr > 0 and 0 <= min_lr <= lr"),
        (dict(warmup_steps=-1), "train.warmup_steps=-1: must be >= 0"),
        (dict(grad_clip=-1.0), r"train.grad_clip=-1: must be >= 0 \(0 disables clipping\)"),
        (dict(eval_interval=0), "train.eval_interval=0: must be >= 1"),
        (dict(checkpoint_interval=0), "train.checkpoint_interval=0: must be >= 1"),
        (dict(log="wandb"), "log='wandb': choose csv, tensorboard or none"),
    ],
)
def test_bad_training_options(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_unknown_training_option_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) \['learning_rate'\]; valid: .*\blr\b"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_data_errors_reach_the_caller(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="too short .9 characters.; the training text must have at least 1000"):
        train(tiny(), quick(data=str(tmp_path / "short.txt")), tmp_path / "run", progress=False)
