"""The command line, in process: info, train -> evaluate -> generate on a tiny run, and exit code 2 with a one-line
message (no traceback) for bad configs, prompts and checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from conftest import PARAGRAPH

from spikedecoder.cli import main

TEXT = "".join(f"Night {i}: {PARAGRAPH}" for i in range(20))  # numbered, so the val and test splits differ
TINY = [
    "--set", "model.n_layer=1",
    "--set", "model.n_embd=32",
    "--set", "model.n_head=2",
    "--set", "model.max_len=24",
    "--set", "train.batch_size=8",
    "--set", "train.eval_batches=2",
    "--set", "train.lr=1e-2",
]  # fmt: skip


def json_tail(text: str) -> dict:
    """The JSON object a command printed last (training prints progress lines before it)."""
    return json.loads(text[text.index("{") :])


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "harbour.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_file: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "snn"
    code = main(
        ["train", "--preset", "spikedecoder", *TINY, "--steps", "20", "--data", str(data_file), "--out", str(out)]
    )
    assert code == 0
    return out


def fails_with(capsys, argv: list[str], *needles: str) -> str:
    """Run argv, expect exit code 2, nothing on stdout, and an `error:` line on stderr containing every needle."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "", "a failing command must not print a partial result (e.g. the echoed prompt)"
    last = [line for line in err.replace("\r", "\n").split("\n") if line.strip()][-1]  # after any progress bar
    assert last.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------------------------------------- info
def test_info_of_a_preset(capsys) -> None:
    assert main(["info", "--preset", "spikedecoder"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("parameters: ")
    for line in ("preset               spikedecoder", "attention            spiking", "timesteps            1"):
        assert line in out
    full = int(out.split("\n")[0].split()[1].replace(",", ""))
    assert main(["info", "--preset", "ann", "--set", "model.n_layer=1"]) == 0
    small = capsys.readouterr().out
    assert "n_layer              1" in small and "attention            softmax" in small
    assert int(small.split("\n")[0].split()[1].replace(",", "")) < full


# ------------------------------------------------------------------------------------ train, evaluate, generate
def test_train_writes_a_checkpoint_and_prints_metrics(run: Path, capsys) -> None:
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "tokenizer.json",
        "training.json",
    ]
    assert (run / "log.csv").read_text().startswith("step,key,value\n")
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["n_embd"] == 32 and config["preset"] == "spikedecoder"
    training = json.loads((run / "checkpoint" / "training.json").read_text())
    assert training["step"] == 20 and training["train"]["lr"] == 1e-2
    assert main(["info", str(run)]) == 0
    assert "trained steps: 20" in capsys.readouterr().out


def test_train_prints_validation_metrics_as_json(tmp_path: Path, data_file: Path, capsys) -> None:
    argv = ["train", "--preset", "ann", *TINY, "--steps", "3", "--data", str(data_file), "--out", str(tmp_path)]
    assert main(argv) == 0
    metrics = json_tail(capsys.readouterr().out)
    assert set(metrics) == {"loss", "accuracy", "tokens", "bits_per_char"}


def test_evaluate_json(run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "val" and 0 < metrics["loss"] < 10 and 0 <= metrics["accuracy"] <= 1
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / 0.6931471805599453)
    assert metrics["tokens"] == int(len(TEXT) * 0.05) - 1  # the whole validation split
    assert main(["evaluate", str(run / "checkpoint"), "--split", "test", "--json"]) == 0
    test_metrics = json.loads(capsys.readouterr().out)
    assert test_metrics["split"] == "test" and test_metrics["loss"] != metrics["loss"]
    assert main(["evaluate", str(run), "--split", "test", "--json", "--batches", "1"]) == 0
    limited = json.loads(capsys.readouterr().out)["tokens"]
    assert limited < test_metrics["tokens"] and limited % 24 == 0  # the full windows only, not the remainder


def test_evaluate_plain_text(run: Path, capsys) -> None:
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "bits_per_char:" in out and "split: val" in out


def copy_run(run: Path, to: Path, **meta_changes) -> Path:
    """A copy of a run whose training.json has some top-level keys replaced (None deletes the key)."""
    (to / "checkpoint").mkdir(parents=True)
    for f in (run / "checkpoint").iterdir():
        (to / "checkpoint" / f.name).write_bytes(f.read_bytes())
    path = to / "checkpoint" / "training.json"
    meta = json.loads(path.read_text())
    for key, value in meta_changes.items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    path.write_text(json.dumps(meta))
    return to


def test_evaluate_any_text_unknown_characters_listed_or_skipped(run: Path, tmp_path: Path, capsys) -> None:
    clean = "the keeper lit the lamp, and the ships came home.\n" * 8
    dirty = tmp_path / "dirty.txt"
    dirty.write_text(clean.replace("lamp", "lamp~Z", 3).replace("home", "home~", 1))
    (tmp_path / "clean.txt").write_text(clean)
    fails_with(
        capsys,
        ["evaluate", str(run), "--data", str(dirty)],
        "2 character(s) the model's vocabulary lacks (7 occurrences): '~', 'Z'",
        "pass --unknown skip",
    )
    assert main(["evaluate", str(run), "--data", str(dirty), "--unknown", "skip", "--json"]) == 0
    skipped = json.loads(capsys.readouterr().out)
    assert skipped["skipped_chars"] == 7 and skipped["data"] == str(dirty.resolve()) and "split" not in skipped
    assert main(["evaluate", str(run), "--data", str(tmp_path / "clean.txt"), "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)
    assert reference["skipped_chars"] == 0 and reference["tokens"] == len(clean) - 1  # the whole file
    for key in ("loss", "bits_per_char", "accuracy", "tokens"):
        assert skipped[key] == reference[key], key  # skipping = evaluating the text without those characters
    assert skipped["bits_per_char"] == pytest.approx(skipped["loss"] / 0.6931471805599453)
    fails_with(capsys, ["evaluate", str(run), "--data", str(dirty), "--split", "test"], "--split picks a part")
    fails_with(capsys, ["evaluate", str(run), "--data", str(tmp_path / "nope.txt")], "nope.txt' does not exist")


def test_evaluate_bpe_reports_perplexity_and_bits_per_char(tmp_path: Path, data_file: Path, capsys) -> None:
    out = tmp_path / "bpe"
    bpe = ["--set", "train.tokenizer=bpe", "--set", "train.vocab_size=300", "--steps", "3"]
    assert main(["train", "--preset", "ann", *TINY, *bpe, "--data", str(data_file), "--out", str(out)]) == 0
    text = tmp_path / "other.txt"
    text.write_text("the keeper climbed the stair; ships came home.\n" * 5)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(text), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    from spikedecoder.rundir import load_checkpoint

    tokenizer = load_checkpoint(out)[1]
    ids = tokenizer.encode(text.read_text())
    assert m["tokens"] == len(ids) - 1 and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["chars"] == len(text.read_text()) - len(tokenizer.decode(ids[:1]))  # the characters predicted
    assert m["bits_per_char"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / m["chars"])


def test_evaluate_finds_the_training_text_from_anywhere(
    run: Path, data_file: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    meta = json.loads((run / "checkpoint" / "training.json").read_text())
    assert meta["data_file"] == {
        "path": str(data_file.resolve()),
        "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
    }
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    # trained on a relative path: the recorded absolute path finds the file from another directory
    text = tmp_path / "texts" / "harbour.txt"
    text.parent.mkdir()
    text.write_bytes(data_file.read_bytes())
    source = {"path": str(text), "sha256": meta["data_file"]["sha256"]}
    moved = copy_run(run, tmp_path / "rel", train={**meta["train"], "data": "harbour.txt"}, data_file=source)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(moved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == expected["loss"]
    text.write_text(TEXT.replace("harbour", "harbor"))
    fails_with(capsys, ["evaluate", str(moved)], "harbour.txt' changed since training", "--data FILE")
    text.unlink()
    fails_with(capsys, ["evaluate", str(moved)], "harbour.txt' has moved or been deleted", "--data FILE")
    # a run from before hashes: its relative path works from the training directory only
    old = copy_run(run, tmp_path / "old", train={**meta["train"], "data": "harbour.txt"}, data_file=None)
    fails_with(capsys, ["evaluate", str(old)], "a path relative to the directory it was trained in")
    monkeypatch.chdir(data_file.parent)
    assert main(["evaluate", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == expected["loss"]


def test_generate_streams_a_continuation(run: Path, capsys) -> None:
    capsys.readouterr()
    argv = ["generate", str(run), "--prompt", "the keeper", "--tokens", "15", "--greedy"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("the keeper") and out.endswith("\n")
    assert len(out) == len("the keeper") + 15 + 1
    assert set(out) <= set(TEXT)
    assert main(argv) == 0 and capsys.readouterr().out == out  # greedy is deterministic
    assert main(["generate", str(run), "--prompt", "a", "--tokens", "10", "--seed", "3", "--top-k", "5"]) == 0
    assert capsys.readouterr().out.startswith("a")


# ---------------------------------------------------------------------------------------------- errors
def test_prompt_with_unknown_characters(run: Path, capsys) -> None:
    fails_with(
        capsys,
        ["generate", str(run), "--prompt", "Zebra~", "--tokens", "5"],
        "2 unknown character(s) not in the tokenizer's vocabulary: 'Z', '~'",
        "use only characters from the training text",
    )


def test_nan_loss_exits_2_naming_the_kept_checkpoint(tmp_path: Path, data_file: Path, capsys, monkeypatch) -> None:
    import spikedecoder.train as train_module

    real = train_module.lm_loss
    calls: list[int] = []

    def nan_at_step_5(logits, targets):
        calls.append(1)
        loss = real(logits, targets)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(train_module, "lm_loss", nan_at_step_5)
    argv = ["train", "--preset", "ann", *TINY, "--set", "train.checkpoint_interval=2", "--steps", "10"]
    fails_with(capsys, [*argv, "--data", str(data_file), "--out", str(tmp_path)], "loss became nan at step 5")
    assert json.loads((tmp_path / "checkpoint" / "training.json").read_text())["step"] == 4


def test_empty_prompt(run: Path, capsys) -> None:
    fails_with(capsys, ["generate", str(run), "--prompt", "", "--tokens", "5"], "empty prompt")


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["model.n_head=3"], ["n_head=3 must divide n_embd=32"]),
        (["model.timesteps=0"], ["timesteps (T) must be an integer >= 1, got 0"]),
        (["model.norm=group"], ["norm='group' is not valid; choose one of layer, batch, power, none"]),
        (["model.n_embed=64"], ["unknown setting model.n_embed; valid keys of [model]:", "n_embd"]),
        (["train.lr=-1"], ["need lr > 0"]),
        (["train.learning_rate=0.1"], ["unknown setting train.learning_rate; valid keys of [train]:", "lr"]),
        (["n_layer=2"], ["--set 'n_layer=2': use section.key=value"]),
        (["model.n_layer"], ["use section.key=value, e.g. --set model.n_layer=6"]),
    ],
)
def test_bad_config_exits_2_with_a_message(tmp_path: Path, data_file: Path, capsys, sets, needles) -> None:
    argv = ["train", "--preset", "spikedecoder", *TINY, "--data", str(data_file), "--out", str(tmp_path / "r")]
    for item in sets:
        argv += ["--set", item]
    fails_with(capsys, argv, *needles)
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_bad_preset_config_file_and_data(tmp_path: Path, data_file: Path, capsys) -> None:
    out = ["--out", str(tmp_path / "r")]
    fails_with(capsys, ["train", "--preset", "snn", *out], "unknown preset 'snn'; choose one of ann")
    fails_with(capsys, ["train", str(tmp_path / "none.toml"), *out], "none.toml does not exist")
    (tmp_path / "bad.toml").write_text("[model\nn_layer = 2\n")
    fails_with(capsys, ["train", str(tmp_path / "bad.toml"), *out], "bad.toml is not valid TOML")
    fails_with(capsys, ["train", "--data", str(tmp_path / "missing.txt"), *out], "missing.txt' does not exist")
    fails_with(capsys, ["info", "--preset", "spikedecoder", "--set", "model.timesteps=0"], "timesteps (T)")


def test_missing_and_corrupt_checkpoints(run: Path, tmp_path: Path, capsys) -> None:
    fails_with(capsys, ["evaluate", str(tmp_path / "nothing")], "no checkpoint at", "spikedecoder train")
    broken = tmp_path / "broken"
    (broken / "checkpoint").mkdir(parents=True)
    for f in (run / "checkpoint").iterdir():
        (broken / "checkpoint" / f.name).write_bytes(f.read_bytes())
    weights = broken / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    fails_with(capsys, ["generate", str(broken), "--prompt", "a"], "model.safetensors is corrupt")
    weights.write_bytes((run / "checkpoint" / "model.safetensors").read_bytes())
    config = broken / "checkpoint" / "config.json"
    config.write_text(config.read_text().replace('"n_embd": 32', '"n_embd": 64'))
    fails_with(capsys, ["evaluate", str(broken)], "does not match its config")
    config.write_text("{not json")
    fails_with(capsys, ["info", str(broken)], "config.json is not valid JSON")
    (broken / "checkpoint" / "tokenizer.json").unlink()
    config.write_text((run / "checkpoint" / "config.json").read_text())
    fails_with(capsys, ["generate", str(broken), "--prompt", "a"], "tokenizer.json is missing")


def test_usage_errors_exit_2_from_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "ann"])  # --out is required
    assert exc.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "run", "--split", "train"])
    assert exc.value.code == 2
