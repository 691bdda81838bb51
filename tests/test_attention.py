"""Spiking self-attention: causal masks (whole context and sliding window), the running-sum identity, and exact
incremental decoding with a window."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BINARY_SPIKES, preset_config, tiny_model

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.attention import SpikingSelfAttention, causal_mask
from spikedecoder.layers import TokenShift, batch_invariant


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
    """Without the key convolution, so that each layer looks back exactly (window - 1) tokens."""
    return tiny_model("spikedecoder", **(dict(max_len=64, v_threshold=0.5, attn_key_conv=False) | overrides))


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


@pytest.mark.parametrize("window", [0, [2, -1, 2, 2], [2, 4, 8], [], True])
def test_window_must_be_valid_and_divide_the_heads(window) -> None:
    with pytest.raises(ValueError, match="attn_window"):
        SpikeDecoderConfig.from_preset("spikedecoder", n_head=4, attn_window=window)


# ---------------------------------------------------------------------------------------------- long-range heads
def _shipped(**overrides) -> SpikeDecoder:
    """A tiny model at the shipped neuron defaults (threshold 1, scale 0.125), random weights."""
    torch.manual_seed(0)
    cfg = preset_config(
        "spikedecoder",
        **{**dict(vocab_size=20, max_len=112, n_layer=2, n_head=4, n_embd=32, timesteps=2, av_norm=True), **overrides},
    )
    return SpikeDecoder(cfg).eval()


LONG_MODES = [
    dict(residual=residual, attn_window=window, attn_norm=norm, attn_offset=offset, attn_key_conv=conv, attn_power=1)
    for residual in (0, 1, 2)
    for window in ([2, 0, 3, 0], None)
    for norm, offset, conv in (
        ("none", False, False),
        ("coincidence", False, True),
        ("none", True, False),
        ("coincidence", True, True),
    )
] + [  # squared coincidences: a d_h^2 x d_h state of pair features
    dict(residual=residual, attn_window=window, attn_norm=norm, attn_offset=True, attn_key_conv=True, attn_power=2)
    for residual in (0, 1)
    for window in ([2, 0, 3, 0], None)
    for norm in ("none", "coincidence")
]


@pytest.mark.parametrize("mode", LONG_MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_long_range_decoding_is_exact_for_100_tokens(mode: dict) -> None:
    """Token-by-token decoding (after a 4-token prefill) equals the full forward bit for bit, for per-head mixes of
    window and whole-context heads, with and without the offset, the coincidence normaliser and the key
    convolution."""
    model = _shipped(**mode)
    with torch.no_grad():  # a trained-looking offset, so that the offset path computes something
        for block in model.blocks:
            if block.attn.offset is not None:
                block.attn.offset.copy_(torch.tensor([0.01, 0.04, 0.02, 0.05]).view(4, 1, 1))
    x = torch.randint(0, 20, (2, 104), generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[:, :10] = (changed[:, :10] + 1) % 20
    with torch.no_grad(), batch_invariant():
        full = model(x)
        cache = model.new_cache()
        steps = [model(x[:, :4], cache)] + [model(x[:, i : i + 1], cache) for i in range(4, 104)]
        far = (model(changed) - full)[:, 50:].abs().amax()
    assert torch.equal(torch.cat(steps, dim=1), full)
    assert far > 0, "the first tokens must still reach position 50+ through the whole-context heads"
    state = cache.layers[0]
    if mode["residual"] != 2:  # fixed-size state: S (d_h x d_h), z and sum v for the long heads, W-1 keys for the rest
        assert state["kv"].shape[-2:] == (8 ** mode.get("attn_power", 1), 8)
        assert "k" not in state or state["k"].shape[-2] == 2
    if mode["attn_key_conv"]:
        assert state["attn_shift"].shape[-2] == 1


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "mode", [dict(attn_window=[2, 0, 3, 0], attn_norm="coincidence", attn_offset=True, attn_key_conv=True)]
)
def test_long_range_heads_are_causal(mode: dict, training: bool) -> None:
    model = _shipped(**mode).train(training)
    x = torch.randint(0, 20, (2, 40), generator=torch.Generator().manual_seed(4))
    changed = x.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 20
    with torch.no_grad():
        diff = (model(changed) - model(x)).abs().amax(dim=(0, 2))
    assert torch.all(diff[:20] == 0), "a change must never reach earlier positions"
    assert diff[20:].max() > 0


@pytest.mark.parametrize(
    "mode",
    [
        dict(attn_window=[2, 0, 3, 0], attn_norm="coincidence", attn_power=2, attn_offset=True, attn_key_conv=True),
        dict(attn_window=None, attn_norm="none", attn_power=1, attn_offset=False, attn_key_conv=False),
        dict(attn_window=[0, 2], attn_norm="coincidence", attn_power=1, attn_offset=True, attn_key_conv=True),
    ],
    ids=["dual-squared-offset", "whole-context-plain", "dual-counts-offset"],
)
def test_sparse_state_decoding_is_the_dense_decoding(mode: dict) -> None:
    """sparse_state (the event engine's whole-context decoding: only the state rows of active features read and
    updated, in place) gives the dense state step's logits and state bit for bit, token after token."""
    dense = _shipped(**(BINARY_SPIKES | mode))  # the sparse step reads rows of binary features
    sparse = copy.deepcopy(dense)
    for module in sparse.modules():
        if isinstance(module, SpikingSelfAttention):
            module.sparse_state = True
    x = torch.randint(0, 20, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        caches = dense.new_cache(), sparse.new_cache()
        for model, cache in zip((dense, sparse), caches, strict=True):
            model(x[:, :5], cache)
        for i in range(5, 40):
            expected, got = (
                model(x[:, i : i + 1], cache) for model, cache in zip((dense, sparse), caches, strict=True)
            )
            assert torch.equal(got, expected), i
    for d, s in zip(*(c.layers for c in caches), strict=True):
        assert s.get("sparse") and torch.equal(s["kv"], d["kv"]) and torch.equal(s["z"], d["z"])


def test_squared_scores_follow_the_formula() -> None:
    """attn_power=2: y_i = sum_j (q_i.k_j)^2 v_j / sum_j (q_i.k_j)^2, checked against the formula."""
    model = _shipped(attn_norm="coincidence", attn_power=2)
    g = torch.Generator().manual_seed(6)
    q, k, v = ((torch.rand(1, 1, 4, 9, 8, generator=g) < 0.4).float() for _ in range(3))
    y = model.blocks[0].attn._running_sum(q, k, v, None)
    scores = torch.einsum("tbhid,tbhjd->tbhij", q, k).tril() ** 2
    assert torch.allclose(y, (scores @ v) / scores.sum(-1, keepdim=True).clamp(min=1))


def test_coincidence_norm_is_a_weighted_mean_of_the_values() -> None:
    """attn_norm='coincidence': y_i = sum_j (q_i.k_j) v_j / sum_j q_i.k_j, checked against the formula."""
    model = _shipped(attn_norm="coincidence", attn_power=1)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(5)
    q, k, v = ((torch.rand(1, 1, 4, 9, 8, generator=g) < 0.4).float() for _ in range(3))
    y = attn._running_sum(q, k, v, None)
    scores = torch.einsum("tbhid,tbhjd->tbhij", q, k).tril()
    expected = (scores @ v) / scores.sum(-1, keepdim=True).clamp(min=1)
    assert torch.allclose(y, expected)
    assert y.max() <= 1 and y.min() >= 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("attn_norm", "softmax"),
        ("attn_window", [2, 0, 0]),
        ("attn_window", []),
        ("attn_key_init", "copy"),
        ("attn_power", 3),
    ],
)
def test_long_range_switches_are_validated(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        SpikeDecoderConfig.from_preset("spikedecoder", n_head=4, **{field: value})
    with pytest.raises(ValueError, match="attn_key_init"):  # the previous token reaches a key only through the conv
        SpikeDecoderConfig.from_preset("spikedecoder", attn_key_conv=False, attn_key_init="previous")


def test_key_init_previous_is_an_induction_lookup_at_initialisation() -> None:
    """attn_key_init='previous': before training, the key spikes of token j are the query spikes of token j-1, so
    a query coincides fully with the key that follows an earlier copy of its own token."""
    model = _shipped(attn_key_conv=True, attn_key_init="previous", attn_window=None)
    attn = model.blocks[0].attn
    seen = {}
    for name in ("q_lif", "k_lif"):
        getattr(attn, name).register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out))
    x = torch.randint(0, 20, (2, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model(x)
    assert seen["q_lif"].sum() > 0
    assert torch.equal(seen["k_lif"][:, :, 1:], seen["q_lif"][:, :, :-1])


def test_a_short_window_list_repeats_over_the_heads() -> None:
    cfg = SpikeDecoderConfig.from_preset("spikedecoder", n_head=4, attn_window=[2, 0])
    assert cfg.head_windows == [2, None, 2, None]
    assert SpikeDecoder(cfg).blocks[0].attn.long == [1, 3]


def test_degree_2_attention_fires_at_window_2_settings() -> None:
    """The window-2 spiking model (binary spikes at T = 4, key convolution) with residual=2, thresholds and scale
    untouched (1 and 0.125), freshly built: the score LIFs and the attention-output LIFs of every block fire (they
    stayed silent, rate 0.0, when the score LIF saw the count times 0.125)."""
    from spikedecoder.neurons import LIF

    cfg = SpikeDecoderConfig.from_preset(
        "spikedecoder", vocab_size=65, n_layer=2, n_head=4, n_embd=128, max_len=64, combine="concat", residual=2,
        timesteps=4, spike_levels=1, qkv_levels=1, v_threshold=1.0, attn_window=2, attn_key_conv=True,
        attn_norm="none", av_norm=True, attn_power=1, surrogate_alpha=2.0, lif_backend="loop",
    )  # fmt: skip
    assert (cfg.residual, cfg.v_threshold, cfg.scale) == (2, 1.0, 0.125)
    torch.manual_seed(0)
    model = SpikeDecoder(cfg).eval()
    rates: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, LIF) and name.endswith(("score_lif", "attn.attn_lif")):
            module.register_forward_hook(lambda m, i, out, name=name: rates.__setitem__(name, out.mean().item()))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, cfg.max_len), generator=torch.Generator().manual_seed(0)))
    assert len(rates) == 2 * cfg.n_layer
    seen = causal_mask(cfg.max_len, 0, torch.device("cpu"), cfg.attn_window).float().mean().item()
    for name, rate in rates.items():  # a score rate is over the whole map: per pair a window head sees, it is higher
        assert (rate / seen if "score" in name else rate) > 0.002, rates


@pytest.mark.parametrize("width", [2, 4])
def test_token_shift_keeps_a_time_invariant_input_invariant(width):
    """The direct-encoded embedding is one tensor expanded over T: the token shift (the key convolution is width 2)
    must keep it so (the projection then runs, and is charged, once) and give exactly what a materialised input
    gives, in decoding too; token i reads tokens i, i-1, ..., i-width+1, zeros before the first."""
    x = torch.randint(0, 2, (1, 2, 5, 8)).float().expand(4, 2, 5, 8)
    shift = TokenShift(width, "shift")
    out = shift(x, None)
    assert out.stride(0) == 0 and out.shape == (4, 2, 5, 8 * width)
    assert torch.equal(out, shift(x.contiguous(), None))
    for j in range(width):
        assert torch.equal(out[..., j:, j * 8 : (j + 1) * 8], x[..., : 5 - j, :])
        assert not out[..., :j, j * 8 : (j + 1) * 8].any()
    state: dict = {}
    steps = [shift(x[:, :, i : i + 1], state) for i in range(5)]
    assert torch.equal(torch.cat(steps, dim=2), out)
    assert state["shift"].shape == (4, 2, width - 1, 8)
