"""benchmarks/readme_figures.py writes the README's measured blocks from a `make run` folder: here on tiny untrained
runs of the built-in corpus, the energy-presets block, whose sentences quote its own table."""

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


def test_the_memory_and_decoding_sentences_quote_their_own_table(make_run: Path, tmp_path: Path, monkeypatch) -> None:
    readme = tmp_path / "README.md"
    blocks = ("make-run", "energy", "energy-presets")
    readme.write_text("".join(f"# {b}\n<!-- figures:{b} -->\nold\n<!-- /figures:{b} -->\n\n" for b in blocks))
    script = load_script()
    monkeypatch.setattr(sys, "argv", ["readme_figures.py", "--run", str(make_run), "--readme", str(readme)])
    script.main()
    text = readme.read_text()
    block = text[text.index("<!-- figures:energy-presets -->") : text.index("<!-- /figures:energy-presets -->")]
    row = [cell.strip() for cell in block.splitlines()[3].strip("|").split("|")]
    assert row[1] == "4.000"  # the spiking model's val bits/char from results.json
    memory_cell = re.fullmatch(r"([\d,]+) / ([\d,]+) \(([\d.]+) %\)", row[-1])
    said = re.search(r"saving is \*\*([\d.]+) %\*\* \(([\d,]+) vs ([\d,]+) pJ per token, the last column\)", block)
    assert memory_cell and said and said.groups() == (memory_cell[3], memory_cell[1], memory_cell[2])
    snn, ann = (float(x.replace(",", "")) for x in memory_cell.groups()[:2])
    assert float(memory_cell[3]) == pytest.approx(100 * (1 - snn / ann), abs=0.06)  # the rounding of the figures
    assert "a **" in block and "incremental decoding" in block.lower()
    assert "old" not in text  # every block written
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--check"])
    with pytest.raises(SystemExit) as done:
        script.main()
    assert done.value.code == 0  # nothing would change
