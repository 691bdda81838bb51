"""The standalone C runtime (runtime/sd.c) gives PyTorch's answers: tiny models trained for a few steps are exported
(`spikedecoder export`), run greedily by `sd` for 200 tokens (sliding past max_len several times) and compared token
by token and logit by logit with `generate` greedy, for make run's spiking model, the `spikedecoder` preset's
whole-context heads and the ANN twin, and make run's model and the ANN with conv_mode "channel" (the Linears' outputs
convolved over the last tokens). Export refuses what the runtime cannot run; sd refuses damaged files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from spikedecoder import cli
from spikedecoder.config import SpikeDecoderConfig
from spikedecoder.generate import generate_ids
from spikedecoder.layers import ChannelConv
from spikedecoder.norms import SeqBatchNorm
from spikedecoder.rundir import load_checkpoint, save_checkpoint, split_ids_for
from spikedecoder.settings import TrainConfig
from spikedecoder.train import train

ROOT = Path(__file__).resolve().parents[1]
SD = ROOT / "runtime" / "sd"
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                                reason="the C runtime needs gcc and make to build")  # fmt: skip

# configs/run.toml's spiking model (make run), at test size
MAKE_RUN = dict(
    combine="concat", timesteps=1, spike_levels=4, qkv_levels=4, v_threshold=0.5, learnable_threshold="channel",
    token_conv=3, mlp_conv=2, attn_window=2, attn_key_conv=True, av_norm=True, attn_norm="none", attn_power=1,
    norm="batch", surrogate_alpha=2.0,
)  # fmt: skip
CHANNEL = dict(token_conv=3, mlp_conv=2, conv_mode="channel")
CASES = {
    "make-run": ("spikedecoder", MAKE_RUN),
    "spikedecoder-preset": ("spikedecoder", dict(timesteps=2)),  # whole-context heads, LayerNorm, attn_power 2
    "ann": ("ann", {}),
    "make-run-channel": ("spikedecoder", MAKE_RUN | CHANNEL),  # Q, V, K (3 wide) and fc1 (2) convolved
    "ann-channel": ("ann", CHANNEL),  # QKV (3 wide, over 3E) and fc1 (2) convolved
    "spikedecoder-preset-channel": ("spikedecoder", dict(timesteps=2) | CHANNEL),  # after a LayerNorm, per step
}
PROMPT = "ROMEO:"
TOKENS = 200


@pytest.fixture(scope="module")
def sd() -> Path:
    result = subprocess.run(["make", "-C", str(ROOT / "runtime")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr  # -Wall -Wextra clean
    return SD


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per case, trained for a few steps on the built-in text (its neurons fire as trained ones do)."""
    torch.set_num_threads(1)
    out = {}
    for name, (preset, overrides) in CASES.items():
        cfg = SpikeDecoderConfig.from_preset(preset, n_layer=2, n_head=4, n_embd=32, max_len=32, **overrides)
        run = tmp_path_factory.mktemp(name)
        settings = TrainConfig(max_steps=12, batch_size=4, eval_interval=12, checkpoint_interval=12, warmup_steps=2,
                               lr=6e-3, log="none", eval_batches=1)  # fmt: skip
        train(cfg, settings, run, progress=False)
        if cfg.conv_mode == "channel":
            _exercise_convolutions(run)
        out[name] = run
    return out


def _exercise_convolutions(run: Path) -> None:
    """Make a tiny channel-mode model's convolutions show in its logits: taps far from their start (1, then 0.5s),
    each tap and channel its own, so a tap read for the wrong token or channel changes the logits; and BatchNorm
    statistics averaged over a few batches, as a longer training settles them (after 12 steps the attention's
    av_norm still shrinks its input and the attention LIF stays silent, hiding Q, K and V)."""
    model, tokenizer, meta = load_checkpoint(run)
    text = split_ids_for(meta, tokenizer, "train")
    gen = torch.Generator().manual_seed(0)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, ChannelConv)}
    assert len(convs) == model.config.n_layer * (2 if model.config.preset == "ann" else 4)  # QKV or Q, K, V; fc1
    norms = [m for m in model.modules() if isinstance(m, SeqBatchNorm)]
    with torch.no_grad():
        for conv in convs.values():
            conv.taps.copy_(torch.empty(conv.taps.shape).uniform_(-0.5, 1.5, generator=gen))
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the batches
        model.train()
        n = model.config.max_len
        for _ in range(8):
            model(torch.stack([text[s : s + n] for s in torch.randint(0, len(text) - n, (4,), generator=gen)]))
        model.eval()
        ids = text[None, :n]
        logits = model(ids)
        for part in ("attn", "mlp"):  # each convolution reaches the logits
            older = [conv.taps[1:] for name, conv in convs.items() if f".{part}." in name]
            for taps in older:
                taps.neg_()
            assert not torch.equal(model(ids), logits), part
            for taps in older:
                taps.neg_()
    save_checkpoint(run, model, tokenizer, meta)


def run_sd(sd: Path, model: Path, *args: str, logits: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["-l", str(logits)] if logits is not None else []
    return subprocess.run([str(sd), str(model), *args, *extra], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_pytorch(case, sd, runs, tmp_path):
    model, tokenizer, _ = load_checkpoint(runs[case])
    binary = tmp_path / "model.bin"
    assert cli.main(["export", str(runs[case]), str(binary)]) == 0
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda m, i, out: seen.append(out[:, -1].clone()))
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    expected = tokenizer.decode(generate_ids(model, ids, TOKENS, greedy=True)[0, ids.shape[1] :].tolist())
    hook.remove()
    result = run_sd(sd, binary, "-p", PROMPT, "-n", str(TOKENS), "-t", "0", logits=tmp_path / "logits")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + expected + "\n"
    theirs = torch.cat(seen).numpy()
    ours = np.fromfile(tmp_path / "logits", dtype=np.float32).reshape(theirs.shape)
    scale = float(np.abs(theirs).max())
    assert float(np.abs(ours - theirs).max()) <= 1e-4 * max(scale, 1.0)
    assert "tokens/s" in result.stderr and "pJ/token" in result.stderr


def test_sampling_options(sd, runs, tmp_path):
    """A seed fixes the text; top-k 1 is greedy; top-p keeps the most likely tokens."""
    binary = tmp_path / "model.bin"
    assert cli.main(["export", str(runs["make-run"]), str(binary)]) == 0
    first = run_sd(sd, binary, "-p", PROMPT, "-n", "60", "-t", "0.8", "-s", "7")
    again = run_sd(sd, binary, "-p", PROMPT, "-n", "60", "-t", "0.8", "-s", "7")
    assert first.returncode == 0 and first.stdout == again.stdout and len(first.stdout) == len(PROMPT) + 61
    greedy = run_sd(sd, binary, "-p", PROMPT, "-n", "60", "-t", "0")
    for flags in (["-k", "1"], ["-P", "1e-6"]):
        assert run_sd(sd, binary, "-p", PROMPT, "-n", "60", "-t", "1.5", "-s", "3", *flags).stdout == greedy.stdout


def test_export_refuses_what_the_runtime_cannot_run(tmp_path, capsys):
    from test_generate import TOKENIZER

    torch.manual_seed(0)
    from spikedecoder import SpikeDecoder

    cfg = SpikeDecoderConfig.from_preset("spikedecoder", vocab_size=TOKENIZER.vocab_size, n_layer=1, n_embd=32,
                                         max_len=16, residual=1, spike_levels=1, qkv_levels=1)  # fmt: skip
    save_checkpoint(tmp_path / "run", SpikeDecoder(cfg).eval(), TOKENIZER, {})
    out = tmp_path / "model.bin"
    assert cli.main(["export", str(tmp_path / "run"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "residual=1" in err[0] and "residual=0" in err[0]
    assert not out.exists()


def test_damaged_files_are_refused(sd, runs, tmp_path):
    binary = tmp_path / "model.bin"
    assert cli.main(["export", str(runs["make-run"]), str(binary)]) == 0
    data = binary.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "header-only": data[:20],
        "bad-magic": b"XXXX" + data[4:],
        "extra-bytes": data + b"\0\0\0\0",
        "wrong-count": data[:4] + data[4:8] + data[8:12] + (10**6).to_bytes(4, "little") + data[16:],
    }
    for name, content in damaged.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(content)
        result = run_sd(sd, path, "-n", "5", "-t", "0")
        assert result.returncode == 1, (name, result)
        assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1, (name, result.stderr)
    missing = run_sd(sd, tmp_path / "none.bin", "-n", "5")
    assert missing.returncode == 1 and "cannot open" in missing.stderr
    unknown = run_sd(sd, binary, "-p", "\u00e9", "-n", "5")
    assert unknown.returncode == 1 and "vocabulary" in unknown.stderr
