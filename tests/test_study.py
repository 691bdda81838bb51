"""The study command on the toy grid (configs/studies/toy.toml: an ANN and a SpikeDecoder, 20 steps each): it writes
results.csv, results.md and the plots from what it measured, resumes an interrupted run, skips finished runs on a
rerun, and refuses to mix in a run trained with other settings."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
from conftest import PARAGRAPH

import spikedecoder.study as study
import spikedecoder.study_report as study_report
from spikedecoder.cli import main
from spikedecoder.energy import compare_reports
from spikedecoder.rundir import read_history
from spikedecoder.train import train

TOY = Path(__file__).resolve().parents[1] / "configs" / "studies" / "toy.toml"
TEXT = PARAGRAPH * 30


def train_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "log.csv", newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh) if row["key"] == "train/loss"]


@pytest.fixture
def counted_train(monkeypatch):
    """Wrap the study's train() to record which variants it trains."""
    calls: list[str] = []
    real = study.train

    def wrapper(model_cfg, train_cfg, run_dir, **kwargs):
        calls.append(Path(run_dir).name)
        return real(model_cfg, train_cfg, run_dir, **kwargs)

    monkeypatch.setattr(study, "train", wrapper)
    return calls


def test_toy_study_writes_results_resumes_and_skips(tmp_path, counted_train):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "study"
    args = ["study", str(TOY), "--out", str(out), "--data", str(data), "--no-progress"]
    variants = study.plan(study.load_study(TOY), str(data))
    assert [v.name for v in variants] == ["ann", "spikedecoder-T2"]
    assert variants[1].model.timesteps == 2 and variants[1].model.combine == "concat"  # variant over preset override

    # an interrupted run: the spiking variant stopped at step 10 of 20
    sd = variants[1]
    train(sd.model, dataclasses.replace(sd.train, max_steps=10), out / "runs" / sd.name, progress=False)
    assert train_steps(out / "runs" / sd.name) == list(range(1, 11))

    assert main(args) == 0
    assert counted_train == ["ann", "spikedecoder-T2"]
    # it resumed at step 11 instead of starting again
    assert train_steps(out / "runs" / sd.name) == list(range(1, 21))

    for name in PLOT_AND_TABLES:
        assert (out / name).stat().st_size > 0, name
    for plot in study.PLOTS:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = {v.name: json.loads((out / "runs" / v.name / "result.json").read_text()) for v in variants}
    for r in results.values():
        assert r["step"] == r["max_steps"] == 20
        assert r["history"] == read_history(out / "runs" / r["name"]) and r["history"][-1]["step"] == 20
    ann, snn = results["ann"], results["spikedecoder-T2"]
    assert ann["energy"]["firing_rates"] == {} and snn["energy"]["firing_rates"]
    assert all(0.0 <= rate <= 1.0 for rate in snn["energy"]["firing_rates"].values())

    with open(out / "results.csv", newline="") as fh:
        rows = {row["name"]: row for row in csv.DictReader(fh)}
    assert list(rows) == ["ann", "spikedecoder-T2"]
    for name, row in rows.items():
        r = results[name]
        assert row["finished"] == "True" and int(row["step"]) == 20
        assert int(row["params"]) == r["params"] and int(row["timesteps"]) == r["fingerprint"]["model"]["timesteps"]
        assert math.isclose(float(row["val_bits_per_char"]), r["val"]["bits_per_char"], rel_tol=1e-5)
        assert math.isclose(float(row["pj_per_token"]), r["energy"]["total_pj_per_token"], rel_tol=1e-5)
    saving = compare_reports(snn["energy"], ann["energy"])["saving_percent"]
    assert math.isclose(float(rows["spikedecoder-T2"]["saving_percent"]), saving, rel_tol=1e-5)
    assert float(rows["ann"]["saving_percent"]) == 0.0 and rows["ann"]["mean_firing_rate"] == ""
    gap = snn["val"]["bits_per_char"] - ann["val"]["bits_per_char"]
    assert math.isclose(float(rows["spikedecoder-T2"]["bits_per_char_gap"]), gap, rel_tol=1e-5, abs_tol=1e-9)

    md = (out / "results.md").read_text()
    assert "| variant | group | params | T | val bits/char |" in md and "pJ/token | saving vs ANN" in md
    line = next(x for x in md.splitlines() if x.startswith("| spikedecoder-T2 |"))
    assert f"{snn['val']['bits_per_char']:.3f}" in line and f"{saving:.1f} %" in line
    assert f"{snn['energy']['mean_firing_rate']:.3f}" in line and f"{snn['params']:,}" in line
    assert "Pareto frontier" in md and "![frontier](frontier.png)" in md

    # rerun: nothing is trained or measured again, only the aggregate files are rewritten
    stamps = {v.name: (out / "runs" / v.name / "result.json").stat().st_mtime_ns for v in variants}
    (out / "results.csv").unlink()
    assert main(args) == 0
    assert counted_train == ["ann", "spikedecoder-T2"]
    assert stamps == {v.name: (out / "runs" / v.name / "result.json").stat().st_mtime_ns for v in variants}
    with open(out / "results.csv", newline="") as fh:
        assert [row["name"] for row in csv.DictReader(fh)] == ["ann", "spikedecoder-T2"]

    # a run recorded before a training option existed used that option's default: still valid
    path = out / "runs" / "ann" / "result.json"
    recorded = json.loads(path.read_text())
    del recorded["fingerprint"]["train"]["beta1"]  # toy.toml leaves beta1 at its default
    del recorded["fingerprint"]["model"]["mlp_conv"]  # model options added later, left at their defaults
    del recorded["fingerprint"]["model"]["float_stages"]  # (a default from a factory: an empty list)
    recorded["fingerprint"]["train"]["retired_option"] = 1
    path.write_text(json.dumps(recorded))
    assert study.stored_result(path.parent, variants[0])["name"] == "ann"

    # a finished run trained with other settings is never mixed into the tables
    assert main([*args, "--set", "train.lr=0.01"]) == 2
    assert counted_train == ["ann", "spikedecoder-T2"]


PLOT_AND_TABLES = ("results.csv", "results.md", "frontier.png", "curves.png", "firing_rates.png")


def test_study_config_errors(tmp_path):
    assert main(["study", str(TOY), "--out", str(tmp_path / "x"), "--only", "nope"]) == 2
    assert main(["study", str(TOY), "--out", str(tmp_path / "x"), "--scale", "gpu"]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text(TOY.read_text().replace('name = "spikedecoder-T2"', 'name = "ann"'))
    assert main(["study", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # nothing is written before the study file is known to be valid


def test_pareto_front():
    rows = [
        {"name": "a", "pj_per_token": 10.0, "val_bits_per_char": 3.0},
        {"name": "b", "pj_per_token": 20.0, "val_bits_per_char": 3.5},  # dominated by a
        {"name": "c", "pj_per_token": 100.0, "val_bits_per_char": 2.0},
        {"name": "d", "pj_per_token": 5.0, "val_bits_per_char": 4.0},
    ]
    assert [r["name"] for r in study_report.pareto(rows, "bits_per_char")] == ["d", "a", "c"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_study_file_plans_valid_variants(path: Path):
    variants = study.plan(study.load_study(path))
    assert len({v.name for v in variants}) == len(variants) >= 2
    assert all(v.model.preset == v.preset for v in variants)


def test_make_run_config_builds_both_presets():
    from spikedecoder.settings import load_config_file, model_config

    config = load_config_file(str(CONFIGS / "run.toml"), [])
    snn, ann = (model_config(config, name) for name in config["compare"]["presets"])
    assert (snn.preset, ann.preset) == ("spikedecoder", "ann")
    assert (snn.n_layer, snn.n_embd) == (ann.n_layer, ann.n_embd)  # twins: same depth and width


def test_a_variant_learns_from_an_earlier_variant(tmp_path):
    """train = {distill = "ann"} in a variant: the teacher is the study's own ann run, trained first, and its cost is
    in the student's result; a teacher listed after its student is refused before anything is trained."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    toy = TOY.read_text().replace("model = { timesteps = 2 }", 'model = { timesteps = 2 }\ntrain = { distill = "ann" }')
    config = tmp_path / "toy.toml"
    config.write_text(toy.replace("max_steps = 20", "max_steps = 4"))
    out = tmp_path / "study"
    assert main(["study", str(config), "--out", str(out), "--data", str(data), "--no-progress"]) == 0
    ann, snn = (json.loads((out / "runs" / n / "result.json").read_text()) for n in ("ann", "spikedecoder-T2"))
    assert "distill" not in ann
    assert snn["distill"]["teacher"] == str((out / "runs" / "ann").resolve())
    assert snn["distill"]["teacher_train_seconds"] == pytest.approx(ann["train_seconds"])
    variants = study.plan(study.load_study(config), str(data))
    with pytest.raises(study.ConfigError, match="names a variant listed after it .* list 'ann' before"):
        study.teachers(variants[::-1], out)
