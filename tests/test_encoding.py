"""Text-to-spike codes: every token and position code is distinct (reported per kind and size), LSB-first binary,
Vaswani sinusoid, learned codes binarised yet trained, layout (T, B, S, E) and rate coding."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from spikedecoder.config import ConfigError, SpikeDecoderConfig, code_bits
from spikedecoder.encoding import (
    SpikeEmbedding,
    assert_unique,
    binary_code,
    code_table,
    count_unique,
    onehot_code,
    sinusoidal_code,
    unique_sinusoid_width,
)

SIZES = (1, 2, 3, 7, 8, 9, 65, 100, 128, 1000, 1024, 1025)


def embedding(**overrides) -> SpikeEmbedding:
    values = dict(vocab_size=20, max_len=24, n_layer=1, n_head=2, n_embd=64, timesteps=3) | overrides
    torch.manual_seed(0)
    return SpikeEmbedding(SpikeDecoderConfig(**values))


def all_pairs(emb: SpikeEmbedding) -> torch.Tensor:
    """The code of every token at every position: (V * max_len, code_width)."""
    cfg = emb.cfg
    ids = torch.arange(cfg.vocab_size)[:, None].expand(-1, cfg.max_len)  # row v: token v at positions 0..L-1
    with torch.no_grad():
        return emb.code(ids).reshape(-1, emb.code_width)


# ---------------------------------------------------------------------------------------------- fixed tables
@pytest.mark.parametrize("n", SIZES)
def test_binary_code_is_lsb_first_minimal_and_distinct(n: int) -> None:
    codes = binary_code(n)
    assert codes.shape == (n, code_bits(n)) and code_bits(n) == max(1, math.ceil(math.log2(n)))
    assert set(codes.unique().tolist()) <= {0.0, 1.0}
    weights = 2 ** torch.arange(codes.shape[1], dtype=torch.float64)
    assert torch.equal((codes.double() @ weights).long(), torch.arange(n))  # bit j of row i is (i >> j) & 1
    assert count_unique(codes) == n
    if n > 2:  # the 2023 defect: MSB-first codes padded on the right made i and 2i collide
        assert not torch.equal(codes[1], codes[2])


@pytest.mark.parametrize("n", SIZES)
def test_onehot_code_is_distinct(n: int) -> None:
    codes = onehot_code(n)
    assert torch.equal(codes.sum(1), torch.ones(n)) and count_unique(codes) == n


def test_sinusoid_is_the_vaswani_pairing_binarised_at_zero() -> None:
    n, dim = 50, 24
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)
    angle = pos / 10000 ** (2 * i / dim)
    expected = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(n, dim)  # sin, cos interleaved
    assert torch.equal(sinusoidal_code(n, dim), (expected > 1e-9).float())
    with pytest.raises(ValueError, match="even width, got 7"):
        sinusoidal_code(n, 7)


@pytest.mark.parametrize("n", (1, 2, 16, 64, 128, 256, 1024))
def test_default_sinusoid_width_is_the_smallest_unique_one(n: int) -> None:
    width = unique_sinusoid_width(n)
    assert count_unique(sinusoidal_code(n, width)) == n
    assert width == 16 or count_unique(sinusoidal_code(n, width - 16)) < n
    assert count_unique(code_table("sinusoidal", n, None)) == n


def test_narrow_sinusoid_collides_and_is_refused_with_a_fix() -> None:
    assert count_unique(sinusoidal_code(128, 16)) < 128  # why the width search exists
    with pytest.raises(ConfigError, match=r"position code 'sinusoidal': only \d+ distinct codes for 128.*code_dim"):
        embedding(max_len=128, token_code="onehot", position_code="sinusoidal", combine="concat", code_dim=16)
    with pytest.raises(ConfigError, match="only 1 distinct codes for 2 entries; widen it"):
        assert_unique(torch.zeros(2, 3), "token code", "widen it")
    with pytest.raises(ValueError, match="'learned' is not a fixed code"):
        code_table("learned", 4, 4)


# ---------------------------------------------------------------------------------------------- the report
def test_every_code_kind_is_unique_for_several_sizes() -> None:
    """Distinct codes / entries for every token and position code of encoding.py; the table prints with -s
    (pytest tests/test_encoding.py -k several_sizes -s) and on failure."""
    rows = []
    for n in (2, 9, 65, 128, 257, 1024):
        for kind in ("onehot", "binary", "sinusoidal"):
            codes = code_table(kind, n, None)
            rows.append((kind, "table", n, codes.shape[1], count_unique(codes)))
    # toy sizes, the default model (65 chars, 128 positions), make run (n_embd 128, 64 positions; 71 chars in
    # its corpus with the test split's characters)
    for vocab, max_len, width in ((2, 3, 64), (20, 24, 64), (65, 128, 64), (65, 64, 128), (71, 64, 128)):
        for token, position in itertools.product(
            ("onehot", "binary", "learned"), ("onehot", "binary", "sinusoidal", "learned")
        ):
            emb = embedding(
                vocab_size=vocab,
                max_len=max_len,
                n_embd=width,
                token_code=token,
                position_code=position,
                combine="concat",
            )
            pairs = all_pairs(emb)
            rows.append((f"{token}+{position}", "concat", vocab * max_len, emb.code_width, count_unique(pairs)))
        for token in ("learned", "float"):
            emb = embedding(vocab_size=vocab, max_len=max_len, n_embd=width, token_code=token, position_code="learned")
            pairs = all_pairs(emb)
            rows.append((f"{token}+learned", "sum", vocab * max_len, emb.code_width, count_unique(pairs)))
    print("\ncode uniqueness (distinct / entries):")
    for kind, how, n, width, distinct in rows:
        print(f"  {kind:<22} {how:<6} width {width:>5}  {distinct:>6} / {n}")
    failures = [row for row in rows if row[4] != row[2]]
    assert not failures, failures


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_learned_codes_stay_distinct_after_training_steps(combine: str) -> None:
    """Nothing forces binarised learned codes apart: check they still are after real updates (make run's sizes and
    learning rate, 25 AdamW steps of the language-model loss), once the updates have flipped bits."""
    from spikedecoder.model import SpikeDecoder

    cfg = SpikeDecoderConfig.from_preset(
        "spikedecoder", vocab_size=65, max_len=64, n_layer=1, n_head=4, n_embd=128, timesteps=1, combine=combine
    )
    torch.manual_seed(0)
    model = SpikeDecoder(cfg).train()
    before = all_pairs(model.embed).clone()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        idx = torch.randint(0, 65, (4, 65), generator=g)
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 65), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = all_pairs(model.embed)
    flipped = int((after != before).sum())
    assert flipped > 100, f"only {flipped} bits moved: the check would prove nothing"
    assert set(after.unique().tolist()) == {0.0, 1.0}
    assert count_unique(after) == 65 * 64, "two (token, position) pairs share a code after training"
    if combine == "concat":
        width = model.embed.token.width
        assert count_unique(after[::64, :width]) == 65 and count_unique(after[:64, width:]) == 64


@pytest.mark.parametrize("kind", ["onehot", "binary", "sinusoidal", "learned"])
def test_position_and_token_parts_are_each_distinct(kind: str) -> None:
    """Not just the pairs: the position part alone tells positions apart, the token part alone tokens."""
    emb = embedding(token_code="binary" if kind != "learned" else "learned", position_code=kind, combine="concat")
    with torch.no_grad():
        tok = emb.code(torch.arange(20)[:, None])[:, 0, : emb.token.width]
        pos = emb.code(torch.zeros(1, 24, dtype=torch.long))[0, :, emb.token.width :]
    assert count_unique(tok) == 20 and count_unique(pos) == 24
    if kind != "learned":
        assert torch.equal(pos, code_table(kind, 24, None))


# ---------------------------------------------------------------------------------------------- spikes and layout
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(token_code="onehot", position_code="onehot", combine="concat"),
        dict(token_code="binary", position_code="sinusoidal", combine="concat"),
        dict(token_code="learned", position_code="learned", combine="concat"),
    ],
)
def test_spike_embedding_emits_binary_codes_repeated_over_t(overrides: dict) -> None:
    emb = embedding(**overrides)
    idx = torch.randint(0, 20, (3, 10))
    out = emb(idx)
    assert out.shape == (3, 3, 10, 64)  # (T, B, S, E)
    assert all(torch.equal(out[t], out[0]) for t in range(3))  # direct coding: the same input every step
    code = emb.code(idx)
    assert set(code.unique().tolist()) <= {0.0, 1.0} and code.sum() > 0
    if emb.in_proj is None:
        assert emb.emits_spikes and torch.equal(out[0], code)
    else:  # a code narrower or wider than n_embd is projected: floats, which the first block turns into spikes
        assert not emb.emits_spikes and emb.code_width != 64


def test_onehot_concat_of_exact_width_needs_no_projection() -> None:
    emb = embedding(vocab_size=40, max_len=24, token_code="onehot", position_code="onehot", combine="concat")
    assert emb.in_proj is None and emb.emits_spikes and emb.code_width == 64


def test_float_code_is_not_binarised() -> None:
    emb = embedding(token_code="float")
    code = emb.code(torch.randint(0, 20, (2, 5)))
    assert not emb.emits_spikes and len(code.unique()) > 2


def test_start_pos_shifts_the_position_code() -> None:
    emb = embedding(token_code="binary", position_code="binary", combine="concat", n_embd=10)  # 5 + 5 bits
    idx = torch.randint(0, 20, (2, 4))
    padded = torch.cat([torch.zeros(2, 7, dtype=torch.long), idx], dim=1)
    shifted = emb.code(idx, start_pos=7)
    assert torch.equal(shifted, emb.code(padded)[:, 7:])
    assert not torch.equal(shifted, emb.code(idx))


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_learned_codes_are_binarised_but_both_tables_train(combine: str) -> None:
    """The 2023 code detached learned positions (.tolist()); here the surrogate carries gradients to both tables."""
    emb = embedding(combine=combine)
    code = emb.code(torch.randint(0, 20, (4, 12)))
    assert set(code.unique().tolist()) == {0.0, 1.0}
    (code * torch.randn_like(code)).sum().backward()
    assert emb.token.table.weight.grad.abs().sum() > 0
    assert emb.position.table.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides",
    [
        dict(token_code="float"),
        dict(token_code="binary", position_code="binary", combine="concat"),
        dict(combine="concat", code_dim=16),
    ],
)
def test_rate_coding_gives_bernoulli_spikes_with_a_gradient(overrides: dict) -> None:
    """Validation refuses rate coding where the code is already {0,1} spikes of width n_embd (a deterministic
    draw: tests/test_config.py); everywhere else the T steps are independent draws."""
    emb = embedding(encoding="rate", timesteps=8, **overrides)
    torch.manual_seed(1)
    out = emb(torch.randint(0, 20, (4, 16)))
    assert set(out.unique().tolist()) <= {0.0, 1.0} and emb.emits_spikes
    assert 0.2 < out.mean() < 0.8 and not all(torch.equal(out[t], out[0]) for t in range(8))
    (out * torch.randn_like(out)).sum().backward()
    trained = emb.in_proj.weight if emb.in_proj is not None else emb.token.table.weight
    assert trained.grad.abs().sum() > 0


def test_config_does_not_import_the_embedding() -> None:
    """No import cycle: the configuration reads a code's width from spikedecoder.codes, as the embedding does."""
    import ast

    import spikedecoder.config

    tree = ast.parse(Path(spikedecoder.config.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "encoding" not in imported and "codes" in imported
