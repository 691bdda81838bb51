"""benchmarks/recall.py's probes: every answer is determined by the context and by nothing nearer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "recall", Path(__file__).resolve().parents[1] / "benchmarks" / "recall.py"
)
recall = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recall)


def test_mqar_answers_are_the_values_bound_to_the_queried_keys() -> None:
    for pairs in (4, 8, 16):
        seq, answer = recall.mqar(64, pairs, torch.Generator().manual_seed(pairs))
        assert seq.shape == answer.shape == (64, recall.SEQ)
        assert int(answer.sum(1).min()) == int(answer.sum(1).max()) == pairs
        for row, marks in zip(seq, answer, strict=True):
            keys, values = row[: 2 * pairs : 2], row[1 : 2 * pairs : 2]
            assert len(set(keys.tolist())) == pairs and torch.isin(keys, recall.KEYS).all()
            bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
            for i in marks.nonzero().flatten().tolist():
                assert row[i + 1].item() == bound[row[i].item()]  # the next token is the queried key's value


def test_copy_repeats_a_string_of_distinct_tokens_after_a_separator() -> None:
    seq, answer = recall.copy(32, torch.Generator().manual_seed(0))
    n = recall.COPY_LEN
    assert torch.equal(seq[:, :n], seq[:, n + 1 : 2 * n + 1]) and (seq[:, n] == recall.SEP).all()
    assert all(len(set(r[:n].tolist())) == n for r in seq)
    assert answer.sum(1).eq(n).all() and answer[:, n : 2 * n].all()  # the separator predicts the first copied token
