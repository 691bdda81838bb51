"""Spiking self-attention: causal masks (whole context and sliding window), the running-sum identity, and exact
incremental decoding with a window."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.attention import causal_mask
from spikedecoder.layers import batch_invariant


def test_causal_mask_whole_context_and_window() -> None:
    full = causal_mask(3, 2, torch.device("cpu"))
    assert full.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    band = causal_mask(3, 2, torch.device("cpu"), window=2)
    assert band.tolist() == [
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


def test_running_sum_equals_explicit_scores() -> None:
    """q_i S_i with S_i = sum_{j<=i} k_j^T v_j is exactly the masked (Q K^T) V of binary operands."""
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.rand(2, 3, 9, 8, generator=g) < 0.3).float() for _ in range(3))
    explicit = (q @ k.transpose(-1, -2) * causal_mask(9, 0, torch.device("cpu"))) @ v
    state = torch.zeros(2, 3, 8, 8)
    rows = []
    for i in range(9):
        state = state + k[..., i : i + 1, :].transpose(-1, -2) @ v[..., i : i + 1, :]
        rows.append(q[..., i : i + 1, :] @ state)
    assert torch.equal(torch.cat(rows, dim=-2), explicit)


def _model(**overrides) -> SpikeDecoder:
    return tiny_model("spikedecoder", **(dict(max_len=64, v_threshold=0.5) | overrides))


@pytest.mark.parametrize("residual, window", [(0, 4), (2, 4), (0, [2, 4]), (2, [4, 3])])
def test_window_limits_how_far_a_token_reaches(residual: int, window) -> None:
    model = _model(attn_window=window, residual=residual)
    x = torch.randint(0, 20, (2, 40), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 20
    with torch.no_grad():
        diff = (model(changed) - model(x)).abs().amax(dim=(0, 2))
    widest = max(window) if isinstance(window, list) else window
    reach = model.config.n_layer * (widest - 1)  # each layer looks back (widest window)-1 tokens
    assert torch.all(diff[:10] == 0), "a change must never reach earlier positions"
    assert torch.all(diff[11 + reach :] == 0), "a change must not reach beyond n_layer * (window-1) positions"
    assert diff[10] > 0


@pytest.mark.parametrize("residual, window", [(0, 5), (2, 5), (0, [2, 5]), (2, [5, 3])])
def test_window_incremental_decoding_is_exact(residual: int, window) -> None:
    model = _model(attn_window=window, residual=residual)
    x = torch.randint(0, 20, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), batch_invariant():
        full = model(x)
        cache = model.new_cache()
        steps = [model(x[:, :7], cache)] + [model(x[:, i : i + 1], cache) for i in range(7, 48)]
        kept = cache.layers[0]["k"].shape[-2]
    assert torch.equal(torch.cat(steps, dim=1), full)
    assert full[0].std(dim=0).max() > 0, "logits must depend on the tokens for the equality to mean anything"
    assert kept == 4, "decoding keeps only window-1 keys, so the cost per token does not grow"


@pytest.mark.parametrize("window", [0, [2, 0, 2, 2], [2, 4], True])
def test_window_must_be_positive_and_one_per_head(window) -> None:
    with pytest.raises(ValueError, match="attn_window"):
        SpikeDecoderConfig.from_preset("spikedecoder", n_head=4, attn_window=window)
