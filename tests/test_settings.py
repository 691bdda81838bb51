"""One precedence rule for settings (command line > [presets.NAME] > shared [model]/[train] > preset defaults),
the same in `train`, `info` and `study`, and a one-line error naming the key for every bad --set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spikedecoder.cli import main
from spikedecoder.config import ConfigError
from spikedecoder.settings import load_config_file, model_config, train_config
from spikedecoder.study import plan

CONFIG = """
[model]
n_layer = 1
n_embd = 16
n_head = 2
max_len = 16
timesteps = 4
tau = 3.0

[presets.spikedecoder]
timesteps = 2
tau = 2.5

[train]
batch_size = 4
eval_batches = 1
lr = 1e-2
"""


@pytest.fixture()
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    return path


def test_command_line_beats_preset_section_beats_shared_section_beats_defaults(config_file: Path) -> None:
    config = load_config_file(str(config_file), [])
    snn, ann = model_config(config, "spikedecoder"), model_config(config, "ann")
    assert (snn.timesteps, snn.tau, snn.n_layer) == (2, 2.5, 1)  # [presets.spikedecoder] over [model]
    assert (ann.tau, ann.n_layer, ann.n_head) == (3.0, 1, 2)  # [model] over the preset's defaults
    assert ann.mlp_ratio == 4  # the preset's default

    config = load_config_file(str(config_file), ["model.timesteps=3"])
    assert model_config(config, "spikedecoder").timesteps == 3  # the command line over [presets.spikedecoder]
    config = load_config_file(str(config_file), ["model.tau=1.5", "presets.spikedecoder.tau=1.25"])
    assert model_config(config, "spikedecoder").tau == 1.25  # --set presets.NAME beats --set model for NAME
    assert model_config(config, "ann").tau == 1.5

    config = load_config_file(str(config_file), ["train.lr=0.5", "train.batch_size=2"])
    tcfg = train_config(config, max_steps=7)
    assert (tcfg.lr, tcfg.batch_size, tcfg.eval_batches, tcfg.max_steps) == (0.5, 2, 1, 7)


def test_study_variants_follow_the_same_rule(tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(
        CONFIG + '\n[[variants]]\nname = "a"\npreset = "spikedecoder"\nmodel = { tau = 1.75 }\n'
        '\n[[variants]]\nname = "b"\npreset = "spikedecoder"\n'
    )
    a, b = plan(load_config_file(str(study), []))
    assert (a.model.tau, b.model.tau, b.model.timesteps) == (1.75, 2.5, 2)  # the variant's table over [presets]
    a, b = plan(load_config_file(str(study), ["model.tau=1.5", "train.lr=0.25"]))
    assert (a.model.tau, b.model.tau, a.train.lr) == (1.5, 1.5, 0.25)  # the command line over both


def test_train_with_set_over_a_preset_section_saves_the_command_line_value(
    config_file: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "text.txt"
    data.write_text("the keeper climbed the stair and lit the lamp.\n" * 40)
    out = tmp_path / "run"
    argv = ["train", str(config_file), "--set", "model.timesteps=3", "--steps", "2", "--data", str(data)]
    assert main([*argv, "--out", str(out)]) == 0
    saved = json.loads((out / "checkpoint" / "config.json").read_text())
    assert saved["timesteps"] == 3 and saved["tau"] == 2.5 and saved["n_layer"] == 1


@pytest.mark.parametrize(
    "item,needles",
    [
        ("train.lr=abc", ["train.lr='abc'", "expected float"]),
        ("model.tau=abc", ["model.tau='abc'", "expected float"]),
        ("train.seed=abc", ["train.seed='abc'", "expected int"]),
        ("modle.n_layer=6", ["unknown section 'modle'", "model, presets"]),
        ("foo.bar=2", ["unknown section 'foo'"]),
        ("model.nlayer=3", ["unknown setting model.nlayer", "n_layer"]),
        ("presets.spikedecoder.bogus=1", ["unknown setting presets.spikedecoder.bogus", "timesteps"]),
        ("presets.nope.tau=1", ["unknown preset 'nope'", "spikedecoder"]),
        ("model.attn_window=[2, 'a']", ["model.attn_window=", "list[int]"]),
        ("n_layer=3", ["use section.key=value"]),
    ],
)
def test_a_bad_set_is_a_one_line_error_naming_the_key(item: str, needles: list[str], capsys) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_file(None, [item])
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert main(["info", "--preset", "spikedecoder", "--set", item]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "Traceback" not in err


def test_a_bad_value_in_the_file_names_its_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[presets.ann]\nn_layer = "two"\n')
    with pytest.raises(ConfigError, match=r"presets.ann.n_layer='two': expected int"):
        model_config(load_config_file(str(path), []), "ann")


def test_help_states_the_precedence(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "highest precedence first" in text and "[presets.NAME]" in text
