"""benchmarks/readme_figures.py writes the measured blocks of the README and docs/ from a `make run` folder, each
wherever its markers are: here on tiny untrained runs of the built-in corpus, the energy-presets block, whose
sentences quote its own table."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.data import CharTokenizer, load_text
from spikedecoder.rundir import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "benchmarks" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_run(tmp_path_factory) -> Path:
    """results.json and two tiny checkpoints, as `make run` leaves them."""
    out = tmp_path_factory.mktemp("make-run")
    tokenizer = CharTokenizer.from_text(load_text(None))
    results = {}
    for seed, preset in enumerate(("spikedecoder", "ann")):
        torch.manual_seed(seed)
        sizes = dict(vocab_size=tokenizer.vocab_size, max_len=12, n_layer=1, n_head=2, n_embd=16)
        model = SpikeDecoder(SpikeDecoderConfig.from_preset(preset, **sizes)).eval()
        save_checkpoint(out / preset, model, tokenizer, {})
        val = {"bits_per_char": 4.0 + seed, "accuracy": 0.1}
        results[preset] = {"val": val, "step": 10, "params": model.num_params(), "train_seconds": 1.0}
    (out / "results.json").write_text(json.dumps(results))
    return out


def page(*blocks: str) -> str:
    return "".join(f"# {b}\n<!-- figures:{b} -->\nold\n<!-- /figures:{b} -->\n\n" for b in blocks)


def run_script(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["readme_figures.py", *argv])
    load_script().main()


def test_the_memory_and_decoding_sentences_quote_their_own_table(make_run: Path, tmp_path: Path, monkeypatch) -> None:
    readme, energy = tmp_path / "README.md", tmp_path / "energy.md"
    readme.write_text(page("make-run"))
    energy.write_text("# Energy\n\n" + page("energy", "energy-presets"))
    files = ["--files", str(readme), str(energy)]
    run_script(monkeypatch, "--run", str(make_run), *files)
    text = energy.read_text()
    block = text[text.index("<!-- figures:energy-presets -->") : text.index("<!-- /figures:energy-presets -->")]
    row = [cell.strip() for cell in block.splitlines()[3].strip("|").split("|")]
    assert row[1] == "4.000"  # the spiking model's val bits/char from results.json
    memory_cell = re.fullmatch(r"([\d,]+) / ([\d,]+) \(([\d.]+) %\)", row[-1])
    said = re.search(r"saving is \*\*([\d.]+) %\*\* \(([\d,]+) vs ([\d,]+) pJ per token, the last column\)", block)
    assert memory_cell and said and said.groups() == (memory_cell[3], memory_cell[1], memory_cell[2])
    snn, ann = (float(x.replace(",", "")) for x in memory_cell.groups()[:2])
    assert float(memory_cell[3]) == pytest.approx(100 * (1 - snn / ann), abs=0.06)  # the rounding of the figures
    assert "a **" in block and "incremental decoding" in block.lower()
    assert text.startswith("# Energy\n\n") and "old" not in text  # both blocks of the docs page written
    assert "| spikedecoder |" in readme.read_text() and "old" not in readme.read_text()  # and the README's
    with pytest.raises(SystemExit) as done:
        run_script(monkeypatch, "--run", str(make_run), *files, "--check")
    assert done.value.code == 0  # nothing would change
    energy.write_text(energy.read_text().replace("| **total** |", "| **sum** |"))
    with pytest.raises(SystemExit) as done:
        run_script(monkeypatch, "--run", str(make_run), *files, "--check")
    assert done.value.code == 1  # a stale docs page is caught
    assert "| **sum** |" in energy.read_text()  # and --check wrote nothing


def test_a_block_is_filled_in_every_page_that_holds_it(tmp_path: Path, monkeypatch) -> None:
    recall = tmp_path / "recall.json"
    results = [{"variant": "ann", "task": "mqar", "pairs": 8, "accuracy": 0.5}]
    recall.write_text(json.dumps({"results": results}))
    pages = [tmp_path / "a.md", tmp_path / "b.md", tmp_path / "c.md"]
    pages[0].write_text(page("recall"))
    pages[1].write_text("intro\n" + page("recall") + "outro\n")
    pages[2].write_text(page("context"))  # a block no source fills is left as it is
    run_script(monkeypatch, "--recall", str(recall), "--files", *map(str, pages))
    for path in pages[:2]:
        assert "| ann | - | 0.500 | - | - |" in path.read_text() and "old" not in path.read_text()
    assert pages[1].read_text().startswith("intro\n") and pages[1].read_text().endswith("outro\n")
    assert pages[2].read_text() == page("context")


def test_a_block_that_no_page_holds_is_an_error(tmp_path: Path, monkeypatch) -> None:
    recall = tmp_path / "recall.json"
    recall.write_text(json.dumps({"results": []}))
    only = tmp_path / "a.md"
    only.write_text(page("decode"))
    with pytest.raises(SystemExit, match="figures:recall"):
        run_script(monkeypatch, "--recall", str(recall), "--files", str(only))
    assert only.read_text() == page("decode")


def test_study_block_takes_the_table_command_and_plots(tmp_path, monkeypatch):
    """A study's block: its command, its table row for row, what is still missing, and its plots copied into docs/
    (not under --check)."""
    study, docs = tmp_path / "study", tmp_path / "docs"
    study.mkdir()
    docs.mkdir()
    table = ["| variant | val bits/char |", "|---|---:|", "| ann | 2.350 |", "| make-run | 2.373 |"]
    (study / "results.md").write_text(
        "# Study results\n\nCommand: `spikedecoder study s.toml --out study`\n\n"
        + "\n".join(table)
        + "\n\nNot yet measured: seed1 (rerun the command to continue).\n\n## Findings\n\n| other | table |\n"
    )
    (study / "frontier.png").write_bytes(b"png-bytes")
    script = load_script()
    block = script.study_block("frontier", study, docs, write=False)
    assert block.startswith("Measured with `spikedecoder study s.toml --out study`:")
    assert "\n".join(table) in block and "| other | table |" not in block
    assert "Not yet measured: seed1" in block and "(frontier_frontier.png)" in block
    assert not (docs / "frontier_frontier.png").exists()
    script.study_block("frontier", study, docs, write=True)
    assert (docs / "frontier_frontier.png").read_bytes() == b"png-bytes"
    (study / "results.md").write_text("# Study results\n\nnothing yet\n")
    with pytest.raises(SystemExit, match="no study table"):
        script.study_block("frontier", study, docs, write=False)
