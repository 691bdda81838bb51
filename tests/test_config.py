"""Configuration validation: combinations that would crash later or be silently ignored are refused at construction,
with a message naming the field and the fix; the combinations that are meaningful still pass."""

from __future__ import annotations

import pytest
import torch

from spikedecoder.config import ConfigError, SpikeDecoderConfig
from spikedecoder.model import SpikeDecoder

TINY = dict(n_layer=1, n_head=2, n_embd=16, max_len=8, vocab_size=11)


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("ann", dict(av_norm=True), r"av_norm=True only applies to spiking attention.*remove av_norm"),
        ("ann", dict(attn_key_conv=True), r"attn_key_conv=True only applies to spiking attention"),
        ("spikedecoder", dict(spike_levels=2, residual=1), r"spike_levels=2, qkv_levels=4, bipolar=False need"),
        ("spikedecoder", dict(bipolar=True, residual=2), r"bipolar=True need residual=0"),
        ("spikedecoder", dict(spike_levels=0), r"spike_levels must be an integer >= 1"),
        ("spikedecoder", dict(qkv_levels=0), r"qkv_levels must be an integer >= 1"),
        ("spikedecoder", dict(qkv_levels=2, residual=1), r"spike_levels=4, qkv_levels=2, bipolar=False need"),
        ("spikedecoder", dict(token_conv=0), r"token_conv must be a positive integer"),
        ("spikedecoder", dict(float_stages=["mlp"]), r"float_stages must be a list of embedding, attn_in, qkv"),
        ("ann", dict(mlp_conv=1.5), r"mlp_conv must be a positive integer"),
        ("ann", dict(conv_mode="depthwise"), r"conv_mode='depthwise' is not valid; choose one of full, channel"),
        (
            "spikedecoder",
            dict(attn_key_conv=True, attn_key_init="previous", conv_mode="channel"),
            r"attn_key_init must be .*conv_mode='full'",
        ),
        ("spiking-attention", dict(attention="softmax", av_norm=True), r"av_norm=True only applies to spiking"),
        ("ann", dict(first_attn_lif=True), r"first_attn_lif=True .*attention='softmax' ignores it"),
        ("spikedecoder", dict(code_dim=8), r"code_dim=8 is ignored: combine='sum'.*use combine='concat'"),
        (
            "spikedecoder",
            dict(combine="concat", token_code="onehot", position_code="binary", code_dim=8),
            r"code_dim=8 is ignored: onehot/binary codes have a fixed width",
        ),
        ("spikedecoder", dict(encoding="rate"), r"encoding='rate' does nothing here: token_code='learned'"),
        (
            "spikedecoder",
            dict(encoding="rate", combine="concat", code_dim=8),  # 8 + 8 = n_embd: no projection
            r"encoding='rate' does nothing here.*use encoding='direct'",
        ),
    ],
)
def test_ignored_or_no_op_settings_are_refused(preset: str, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SpikeDecoderConfig.from_preset(preset, **TINY, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attn_window=2, av_norm=True, first_attn_lif=True),  # spiking attention uses all three
        dict(token_conv=4, mlp_conv=2, spike_levels=4, bipolar=True, timesteps=1),
        dict(combine="concat", code_dim=6),  # learned codes of width 6
        dict(combine="concat", token_code="onehot", position_code="sinusoidal", code_dim=16),
        dict(encoding="rate", token_code="float"),  # sigmoid of a float current: a real Bernoulli draw
        dict(encoding="rate", combine="concat", code_dim=6),  # width 12 != 16: a projection, then Bernoulli
        dict(encoding="rate", combine="concat", token_code="binary", position_code="binary"),
    ],
)
def test_meaningful_combinations_still_validate(overrides: dict) -> None:
    SpikeDecoderConfig.from_preset("spikedecoder", **TINY, **overrides)


def test_rate_coding_accepted_by_validate_really_draws() -> None:
    """The rule matches the model: where validate lets rate coding through, the T steps differ."""
    cfg = SpikeDecoderConfig.from_preset("spikedecoder", **TINY, timesteps=8, encoding="rate", token_code="float")
    torch.manual_seed(0)
    spikes = SpikeDecoder(cfg).embed(torch.randint(0, 11, (2, 8)))
    assert not all(torch.equal(spikes[t], spikes[0]) for t in range(8))


def test_degree_2_residual_with_a_threshold_per_channel_builds_and_learns() -> None:
    """The score map has no channel axis: its LIF learns one threshold (and one decay), every other LIF one per
    channel."""
    cfg = SpikeDecoderConfig.from_preset(
        "spikedecoder", **TINY, residual=2, spike_levels=1, qkv_levels=1, learnable_threshold="channel",
        learnable_tau="channel",
    )  # fmt: skip
    torch.manual_seed(0)
    model = SpikeDecoder(cfg)
    attn = model.blocks[0].attn
    assert attn.score_lif.v_threshold.shape == () and attn.q_lif.v_threshold.shape == (16,)
    assert attn.score_lif.decay_logit.shape == () and attn.q_lif.decay_logit.shape == (16,)
    logits = model(torch.randint(0, 11, (3, 8)))
    logits.logsumexp(-1).sum().backward()
    assert attn.q_lif.v_threshold.grad.abs().sum() > 0
    assert attn.score_lif.v_threshold.grad is not None and torch.isfinite(attn.score_lif.v_threshold.grad)
    assert attn.q_lif.decay_logit.grad.abs().sum() > 0 and torch.isfinite(attn.score_lif.decay_logit.grad)
