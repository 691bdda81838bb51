"""Checkpoints: save_pretrained -> from_pretrained gives bitwise the same model, writes are atomic, and every kind of
missing or corrupt file gives an error that says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from spikedecoder import ConfigError, SpikeDecoder
from spikedecoder.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    atomic_directory,
    load_model_files,
    resolve,
    tensors_equal,
)

V = 19


def make_model(preset: str = "spikedecoder", **overrides) -> SpikeDecoder:
    model = tiny_model(preset, **(dict(vocab_size=V, max_len=12, n_embd=16) | overrides))
    if model.config.norm in ("batch", "power") or model.config.learnable_threshold != "none":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for seed in range(2):  # running statistics and thresholds away from their initial values
            idx = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(seed))
            model(idx).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return make_model().save_pretrained(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("ann", {}),
        ("spiking-attention", {}),
        ("spiking-attention-mlp", dict(residual=1)),
        ("spikedecoder", {}),
        ("spikedecoder", dict(norm="batch", learnable_threshold="channel")),
        ("spikedecoder", dict(norm="power", learnable_threshold="layer", residual=2)),
        (
            "spikedecoder",
            dict(token_code="binary", position_code="sinusoidal", combine="concat", head_combine="concat"),
        ),
    ],
)
def test_save_then_load_gives_the_same_logits(tmp_path: Path, preset: str, overrides: dict) -> None:
    model = make_model(preset, **overrides)
    with torch.no_grad():
        expected = model(ids())
    path = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [CONFIG, WEIGHTS]
    loaded = SpikeDecoder.from_pretrained(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert tensors_equal(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(ids()), expected)


def test_folded_model_is_not_mistaken_for_its_unfolded_config(tmp_path: Path) -> None:
    """A folded model has no norm parameters: loading it into its config must fail loudly, not silently."""
    model = make_model(norm="batch")
    model.fold_norms()
    model.save_pretrained(tmp_path / "folded")
    with pytest.raises(ValueError, match="does not match its config: missing .*norm"):
        SpikeDecoder.from_pretrained(tmp_path / "folded")


def test_extra_files_and_weights_are_plain_safetensors(tmp_path: Path) -> None:
    path = make_model().save_pretrained(tmp_path / "ckpt", files={"README.txt": "hello\n"})
    assert (path / "README.txt").read_text() == "hello\n"
    config, state = load_model_files(path)
    assert config["n_embd"] == 16 and config["preset"] == "spikedecoder"
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in path.iterdir())


# ---------------------------------------------------------------------------------------------- atomic writes
def test_overwrite_replaces_the_checkpoint_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    make_model().save_pretrained(target)
    other = make_model(n_layer=1)
    other.save_pretrained(target)
    assert SpikeDecoder.from_pretrained(target).config.n_layer == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_write_keeps_the_old_checkpoint(tmp_path: Path, saved: Path) -> None:
    before = (saved / WEIGHTS).read_bytes()

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_directory(saved, write)
    assert (saved / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    SpikeDecoder.from_pretrained(saved)


def test_crash_between_the_renames_falls_back_to_the_previous_checkpoint(saved: Path) -> None:
    old = saved.with_name(f".{saved.name}.old")
    saved.rename(old)  # what a crash after `target -> .old` and before `tmp -> target` leaves
    assert resolve(saved) == old
    with torch.no_grad():
        assert torch.equal(SpikeDecoder.from_pretrained(saved)(ids()), make_model()(ids()))


# ---------------------------------------------------------------------------------------------- errors
def test_missing_checkpoint_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nowhere; train one with `spikedecoder train`"):
        SpikeDecoder.from_pretrained(tmp_path / "nowhere")


def test_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="model.bin is a file; a checkpoint is a directory with config.json"):
        SpikeDecoder.from_pretrained(tmp_path / "model.bin")


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_missing_file(saved: Path, name: str) -> None:
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} is missing; the checkpoint is incomplete"):
        SpikeDecoder.from_pretrained(saved)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[: len(b) // 2],  # truncated in the tensor data
        lambda b: b[:-1],  # one byte short
        lambda b: b[:6],  # truncated inside the header length
        lambda b: b"",
        lambda b: b"this is not a safetensors file at all",
    ],
    ids=["half", "last-byte", "header", "empty", "garbage"],
)
def test_corrupt_weights(saved: Path, corrupt) -> None:
    weights = saved / WEIGHTS
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or not a safetensors file .*restore it"):
        SpikeDecoder.from_pretrained(saved)


@pytest.mark.parametrize("text", ['{"n_layer": 2,', "", "\x00\x01binary", "{'single': 'quotes'}"])
def test_invalid_json_config(saved: Path, text: str) -> None:
    (saved / CONFIG).write_text(text)
    with pytest.raises(CheckpointError, match="config.json is not valid JSON .*the checkpoint is corrupt"):
        SpikeDecoder.from_pretrained(saved)


@pytest.mark.parametrize(("text", "kind"), [("5", "int"), ("null", "NoneType"), ("[1, 2]", "list"), ('"abc"', "str")])
def test_json_config_that_is_not_an_object(saved: Path, text: str, kind: str) -> None:
    (saved / CONFIG).write_text(text)
    with pytest.raises(CheckpointError, match=f"config.json holds a JSON {kind}, not an object; .*corrupt"):
        SpikeDecoder.from_pretrained(saved)


def test_config_with_an_invalid_value_names_the_field(saved: Path) -> None:
    config = json.loads((saved / CONFIG).read_text())
    (saved / CONFIG).write_text(json.dumps(config | {"n_head": 3}))
    with pytest.raises(ConfigError, match="n_head=3 must divide n_embd=16"):
        SpikeDecoder.from_pretrained(saved)
    (saved / CONFIG).write_text(json.dumps(config | {"heads": 2}))
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['heads'\]"):
        SpikeDecoder.from_pretrained(saved)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(n_layer=3), r"does not match its config: missing \['blocks\.2\."),
        (dict(n_layer=1), r"does not match its config: missing \[\], unexpected \['blocks\.1\."),
        (dict(n_embd=32), r"does not match its config: \d+ tensor\(s\) have a shape .*, \.\.\.\); it was written"),
        (dict(vocab_size=V + 1), r"does not match its config: 3 tensor\(s\) .*embed\.token.*head\.out"),
    ],
)
def test_config_that_disagrees_with_the_weights(saved: Path, change: dict, message: str) -> None:
    config = json.loads((saved / CONFIG).read_text())
    (saved / CONFIG).write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=message):
        SpikeDecoder.from_pretrained(saved)
