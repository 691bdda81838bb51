"""Energy accounting: exact op counts on hand-built models (computed by hand below), norms and folding, firing rates,
pricing, the report and CLI, and a cross-check against SpikingJelly's op counter where it is installed."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch import nn

from spikedecoder import SpikeDecoder, SpikeDecoderConfig
from spikedecoder.attention import SoftmaxAttention, SpikingSelfAttention, causal_mask
from spikedecoder.energy import (
    PRESETS,
    compare_reports,
    count_ops,
    decode_report,
    deployed,
    energy_report,
    energy_scope,
    step_energy,
    subblock,
)
from spikedecoder.layers import LinearNorm, TokenShift, batch_invariant
from spikedecoder.neurons import LIF

V = 20


def tiny(preset: str = "spikedecoder", seed: int = 0, **overrides) -> SpikeDecoder:
    """A small random model; BatchNorm/PowerNorm get running statistics from a few training forwards."""
    return tiny_model(preset, seed, warm_norms=True, **(dict(vocab_size=V) | overrides))


def ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


class InBlock(nn.Module):
    """Puts a module in block 0 as attention or MLP, declaring the places SpikeDecoder's own modules declare."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.energy_group, self.energy_own = "block0", "residual"  # as a Block (whose forward this one stands for)
        block = nn.Module()
        if getattr(module, "energy_group", None) is None:
            module.energy_group = {"attn": "attention", "mlp": "mlp"}[name]
        block.add_module(name, module)
        self.blocks = nn.ModuleList([block])
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.blocks[0], self.name)(x)


# ---------------------------------------------------------------------------------------------- hand-counted ops
def test_linear_on_a_known_spike_pattern_costs_nnz_times_fan_out():
    lin = nn.Linear(4, 3)
    spikes = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])  # 3 spikes, each reaching 3 outputs
    ops = count_ops(lin, spikes).place("model")
    assert ops == {"ac": 9, "ac_fanout": 9, "add": 6, "mem": 9}  # 2 rows x 3 bias adds

    # the same layer on non-binary values: detected from the data, so MACs (zeros still skipped)
    ops = count_ops(lin, spikes * 1.5).place("model")
    assert ops == {"mac": 9, "add": 6, "mem": 9}
    # on graded spikes (small integer counts) each active row is added |count| times: 2 x 3 spikes x 3 outputs
    ops = count_ops(lin, spikes * 2).place("model")
    assert ops == {"ac": 18, "ac_fanout": 18, "add": 6, "mem": 9}
    dense = torch.tensor([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.2, 0.7]])
    assert count_ops(lin, dense).place("model")["mac"] == 2 * 4 * 3

    # a (T, B, E) input goes through aten.linear's reshapes: same rule
    t_spikes = torch.stack([spikes, torch.zeros_like(spikes), spikes.flip(0)])  # 6 spikes over T=3
    assert count_ops(lin, t_spikes).place("model")["ac"] == 6 * 3


class CoincidenceAttention(nn.Module):
    """Causal spiking attention on given q, k, v spikes: (Q K^T * causal mask) V, as SpikingSelfAttention does."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        s = q.shape[-2]
        with energy_scope("scores"):
            scores = (q @ k.transpose(-1, -2)) * torch.ones(s, s, dtype=torch.bool).tril()
        with energy_scope("values"):
            return scores @ v


def test_qk_and_av_on_spikes_count_exact_coincidences_and_fan_out():
    q = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    k = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 0, 1]])
    v = torch.tensor([[0.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    # q_i . k_j by hand:      j=0 j=1 j=2
    #                   i=0    1   1   2
    #                   i=1    0   2   1
    #                   i=2    1   0   2      all 10; causal (j <= i): 1 + 0+2 + 1+0+2 = 6
    # masked A = [[1,0,0],[0,2,0],[1,0,2]]: non-zero A_ij times nnz(v_j) = 1 + 2 + 1 + 2 = 6 (nnz(v) = 1, 2, 2)
    # fan-out (paper), over the pairs the causal mask keeps: each spike of q_i reaches keys 0..i, nnz(q_i) = 2, 2, 2:
    # 2*1 + 2*2 + 2*3 = 12; A is not binary, so each spike of v_j reaches queries j..2: 1*3 + 2*2 + 2*1 = 9
    model = InBlock("attn", CoincidenceAttention())
    ops = count_ops(model, torch.stack([q, k, v]))
    assert ops.place("block0.attention.scores") == {"ac": 6, "ac_fanout": 12}
    assert ops.place("block0.attention.values") == {"ac": 6, "ac_fanout": 9}
    assert [r["fanout"] for r in ops.products] == [12, 9]
    full = count_ops(model, torch.stack([q, k, v]), skip_masked=False)
    assert full.place("block0.attention.scores") == {"ac": 10, "ac_fanout": 18}  # the dense product, all pairs
    assert full.place("block0.attention.values") == {"ac": 6, "ac_fanout": 15}  # nnz(V) * S = 5 * 3
    assert [r["charged"] for r in ops.products] == [6, 6]
    assert [r["computed"] for r in ops.products] == [10, 6]


class WindowedCoincidence(nn.Module):
    """Q K^T under the model's own per-head sliding-window mask (head 0 sees 1 token, head 1 sees 2)."""

    def forward(self, qk: torch.Tensor) -> torch.Tensor:
        q, k = qk.unbind(0)  # (H, S, d)
        with energy_scope("scores"):
            return (q @ k.transpose(-1, -2)) * causal_mask(q.shape[-2], 0, q.device, (1, 2))


def test_a_window_per_head_charges_only_the_pairs_each_head_sees():
    q = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
    k = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 0, 1]])
    # same q_i . k_j table as above; head 0 (j = i): 1 + 2 + 2 = 5; head 1 (j in i-1, i): 1 + (0 + 2) + (0 + 2) = 5
    ops = count_ops(InBlock("attn", WindowedCoincidence()), torch.stack([q, k]).unsqueeze(1).expand(2, 2, 3, 4))
    assert ops.place("block0.attention.scores")["ac"] == 10


def test_normaliser_and_offset_charge_their_sums_and_divisions_to_state():
    """attn_norm + attn_offset on whole-context heads, by hand: the row sums of the (integer) score map (S-1 adds
    per row), the running count of each value channel (an add where a spike arrives), the offset's multiply and
    subtract per output, the clamp (a comparison per row) and one division per output."""
    torch.manual_seed(0)
    cfg = SpikeDecoderConfig.from_preset(
        "spikedecoder", vocab_size=V, max_len=8, n_layer=1, n_head=2, n_embd=8, attn_norm="coincidence",
        attn_offset=True, timesteps=1, attn_window=None,
    )  # fmt: skip
    attn = SpikingSelfAttention(cfg, input_spikes=True)
    with torch.no_grad():
        attn.offset.copy_(torch.tensor([0.3, 0.7]).view(2, 1, 1))  # a trained offset (zeros would read as spikes)
    g = torch.Generator().manual_seed(2)
    q, k, v = ((torch.rand(1, 1, 2, 6, 4, generator=g) < 0.5).float() for _ in range(3))

    class State(nn.Module):
        energy_group = "attention"

        def __init__(self):
            super().__init__()
            self.offset = attn.offset  # a parameter of the counted model (a constant), as inside SpikeDecoder

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return attn._running_sum(*x.unbind(0), None)

    ops = count_ops(InBlock("attn", State()), torch.stack([q, k, v]))
    rows, outputs = 2 * 6, 2 * 6 * 4
    assert ops.place("block0.attention.state") == {
        "add": rows * 5 + int(v.sum()) + outputs,  # row sums, running value counts, subtracting the offset term
        "mul": outputs,
        "cmp": rows,
        "div": outputs,
    }


def softmax_attention_ops(s: int, e: int, h: int) -> dict[str, dict[str, int]]:
    """Hand count for SoftmaxAttention on one sequence of s tokens, width e, h heads (d = e / h)."""
    d, rows, pairs = e // h, s, h * s * (s + 1) // 2
    return {
        "block0.attention.norms": {"add": rows * 2 * e, "mac": rows * 2 * e, "mul": rows * (e + 2), "sqrt": rows,
                                   "div": rows},
        "block0.attention.qkv": {"mac": s * e * 3 * e, "mem": s * e * 3 * e, "add": s * 3 * e},
        # the query scaled by 1/sqrt(d) (the keys as they are, as a K/V cache keeps them); then softmax over the
        # unmasked pairs: max, subtract, exp, sum, one reciprocal per row and a multiply per entry
        "block0.attention.scores": {"mul": s * e + pairs, "mac": pairs * d, "cmp": pairs, "add": 2 * pairs,
                                    "exp": pairs, "div": h * s},
        "block0.attention.values": {"mac": pairs * d},
        "block0.attention.proj": {"mac": s * e * e, "mem": s * e * e, "add": s * e},
    }  # fmt: skip


def test_softmax_attention_counts_match_the_hand_count():
    torch.manual_seed(0)
    cfg = SpikeDecoderConfig.from_preset("ann", vocab_size=V, max_len=8, n_layer=1, n_head=2, n_embd=4)
    model = InBlock("attn", SoftmaxAttention(cfg)).eval()
    ops = count_ops(model, torch.randn(1, 1, 3, 4))
    assert ops.counts == softmax_attention_ops(s=3, e=4, h=2)
    assert not ops.unpriced


def test_softmax_attention_is_charged_the_same_whatever_kernel_torch_runs():
    """scaled_dot_product_attention is charged by its rule from its arguments: torch's math form (which rescales
    every cached key) and its fused kernel give the same counts, in a full forward and in a cached step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model("ann")
    idx = ids(batch=1, length=12)
    cache = model.new_cache()
    with torch.no_grad():
        model(idx[:, :8], cache)
    for step in (lambda: count_ops(model, idx), lambda: count_ops(model, idx[:, 8:9], cache=copy.deepcopy(cache))):
        fused = step()
        with sdpa_kernel(SDPBackend.MATH):
            math_form = step()
        assert fused.counts == math_form.counts and not fused.unpriced
    e, cached = model.config.n_embd, count_ops(model, idx[:, 8:9], cache=cache)
    pairs = model.config.n_head * 9  # the new query against 9 keys, per head
    assert cached.place("block0.attention.scores")["mul"] == e + pairs  # the query scaled, then softmax's multiplies


def test_fanout_columns_agree_and_skip_what_the_mask_discards():
    """The nnz * fan-out count is kept twice (per kind and place, and per matrix product): both agree, for a spiking
    model with window and whole-context heads and for the ANN, where (no spikes) it is the exact count."""
    for model in (tiny("spikedecoder", attn_window=[2, 0], attn_norm="coincidence"), tiny("ann")):
        r = energy_report(model, ids())
        ops = count_ops(deployed(model), ids())
        spikes = [p for p in ops.products if p["kind"] == "ac"]
        assert sum(p["fanout"] for p in spikes) == ops.total("ac_fanout")
        prices = PRESETS["fp32"].prices()
        synaptic_fanout = sum(p["fanout"] * prices[p["kind"]] for p in ops.products) / ops.tokens
        assert r["synaptic_pj_per_token_fanout"] == pytest.approx(synaptic_fanout, rel=1e-12)
        if model.config.preset == "ann":
            assert r["total_pj_per_token_fanout"] == pytest.approx(r["total_pj_per_token"], rel=1e-12)
            assert r["synaptic_pj_per_token_fanout"] == pytest.approx(r["synaptic_pj_per_token"], rel=1e-12)


class FusedSDPA(nn.Module):
    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]


def test_fused_attention_kernel_is_charged_like_its_math_form():
    qkv = torch.randn(3, 1, 2, 3, 2)  # (q/k/v, B, H, S, d)
    ops = count_ops(InBlock("attn", FusedSDPA()), qkv)
    expected = softmax_attention_ops(s=3, e=4, h=2)
    assert ops.place("block0.attention.scores") == expected["block0.attention.scores"]
    assert ops.place("block0.attention.values") == expected["block0.attention.values"]


def test_layer_norm_is_charged_per_row():
    x = torch.randn(2, 3, 5)  # 6 rows of C = 5
    ops = count_ops(nn.LayerNorm(5), x).place("model")
    assert ops == {"add": 6 * 2 * 5, "mac": 6 * (5 + 5), "mul": 6 * (5 + 2), "sqrt": 6, "div": 6}
    bare = count_ops(nn.LayerNorm(5, elementwise_affine=False), x).place("model")
    assert bare["mac"] == 6 * 5  # the variance only: no affine


@pytest.mark.parametrize("norm", ["batch", "power"])
def test_folded_batch_and_power_norm_cost_nothing(norm):
    torch.manual_seed(0)
    layer = LinearNorm(4, 3, norm)
    layer.train()
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(8, 4))
    layer.eval()
    spikes = (torch.rand(5, 4) < 0.5).float()
    before = count_ops(layer, spikes)
    expected = {"mac": 5 * 3} if norm == "batch" else {"mul": 5 * 3, "add": 5 * 3}  # x * a + c per element
    assert before.place("norm") == expected
    assert layer.fold()
    after = count_ops(layer, spikes)
    assert after.place("norm") == {}
    assert after.place("linear") == before.place("linear")


def test_lif_updates_comparisons_and_firing_rate():
    lif = LIF(tau=2.0, v_threshold=1.0, backend="fused")
    # tau = 2: input 3.0 charges to 1.5 and fires every step; input 1.5 charges to .75, 1.125 (fire), .75, 1.125
    x = torch.tensor([[3.0, 1.5]] * 4)
    ops = count_ops(InBlock("mlp", nn.Sequential(lif)), x)
    # tau = 2 with decay_input: h = (v + x) / 2 is an add and a shift, then a comparison; the reset is a select.
    # The LIF's inner ops (sub, div, add, mul of the float loop) are not recounted.
    assert ops.place("block0.mlp.lif") == {"add": 8, "shift": 8, "cmp": 8}
    assert ops.firing == {"blocks.0.mlp.0": (6, 8)}
    assert ops.firing_rates() == {"blocks.0.mlp.0": 0.75}
    assert lif.backend == "fused"  # restored after counting on the loop backend


@pytest.mark.parametrize(
    "tau, decay_input, per_update",
    [
        (2.0, False, {"add": 2, "shift": 1, "cmp": 1}),  # v - v / 2 + x: two adds, one shift
        (4.0, True, {"add": 2, "shift": 2, "cmp": 1}),  # v - v / 4 + x / 4: two adds, two shifts
        (3.0, True, {"lif": 1, "add": 1, "cmp": 1}),  # v + (x - v) / 3: a multiply-accumulate and an add
        (3.0, False, {"lif": 1, "cmp": 1}),  # v (1 - 1/3) + x: one multiply-accumulate
    ],
)
def test_lif_update_is_priced_as_the_arithmetic_its_tau_needs(tau, decay_input, per_update):
    x = torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(0)) * 3  # 10 neurons x 3 steps = 30 updates
    ops = count_ops(InBlock("mlp", nn.Sequential(LIF(tau=tau, decay_input=decay_input))), x)
    assert ops.place("block0.mlp.lif") == {k: 30 * n for k, n in per_update.items()}


@pytest.mark.parametrize("tau", [2.0, 3.0])
@pytest.mark.parametrize(
    "decay_input, per_update",
    [
        (True, {"lif": 1, "add": 1, "cmp": 1}),  # v + (x - v) * d: an add and a multiply-accumulate
        (False, {"lif": 1, "cmp": 1}),  # v (1 - d) + x: one multiply-accumulate
    ],
)
@pytest.mark.parametrize("mode", ["layer", "channel"])
def test_learned_decay_is_priced_as_a_multiply_even_at_one_half(tau, decay_input, per_update, mode):
    """A learned decay is a number the training chose: never a shift, even where it starts (or ends) at 1/2."""
    x = torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(0)) * 3
    lif = LIF(tau=tau, decay_input=decay_input, learnable_tau=mode, channels=5)
    ops = count_ops(InBlock("mlp", nn.Sequential(lif)), x)
    assert ops.place("block0.mlp.lif") == {k: 30 * n for k, n in per_update.items()}


def test_time_invariant_linear_is_charged_once_and_rows_read_once_per_token():
    """A LinearNorm on an input expanded over T = 4 (as direct encoding presents the embedding) runs once in the
    event engine, and so is charged once; a Linear on spikes varying over T reads, per token, the rows of the
    inputs active at any step."""
    layer = LinearNorm(4, 3, "layer").eval()
    step = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])  # 2 tokens, 3 spikes
    expanded = step.expand(4, 1, 2, 4)
    ops = count_ops(layer, expanded)
    # one step: 3 spikes x 3 outputs = 9 AC, 2 rows x 3 bias adds, LayerNorm on 2 rows of 3; weights read: 3 rows of 3
    linear, norm = ops.place("linear"), ops.place("norm")
    assert linear == {"ac": 9, "ac_fanout": 9, "add": 6, "mem": 9}
    assert norm == {"add": 2 * 2 * 3, "mac": 2 * 2 * 3, "mul": 2 * (3 + 2), "sqrt": 2, "div": 2}
    assert count_ops(layer, expanded.contiguous()).place("linear")["ac"] == 4 * 9  # a copy is not time-invariant
    # varying over T = 2: token 0 uses inputs {0, 2} then {0, 1}: 3 distinct rows; token 1 {3} then none: 1 row
    varying = torch.tensor([[[[1.0, 0, 1, 0], [0, 0, 0, 1]]], [[[1.0, 1, 0, 0], [0, 0, 0, 0]]]])
    ops = count_ops(layer, varying).place("linear")
    assert ops == {"ac": 5 * 3, "ac_fanout": 5 * 3, "add": 4 * 3, "mem": (3 + 1) * 3}


def test_token_shift_linear_is_charged_for_the_spikes_of_every_token_it_reads():
    """A Linear after a width-3 token shift reads each token's spikes and those of the two before it: on spikes it
    is charged (sum of the three tokens' spikes) x fan-out, still once for a time-invariant input."""
    shift, layer = TokenShift(3, "shift"), LinearNorm(3 * 4, 5, "none").eval()
    model = nn.Sequential(shift, layer)
    step = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1.0, 1, 1, 0]])  # 3 tokens with 2, 1, 3 spikes
    # token 0 reads its 2 spikes; token 1: 1 + 2; token 2: 3 + 1 + 2 -> 11 spikes x 5 outputs
    ops = count_ops(model, step.expand(4, 1, 3, 4)).counts["1.linear"]
    assert ops["ac"] == 11 * 5 and ops["add"] == 3 * 5
    assert count_ops(model, step.expand(4, 1, 3, 4).contiguous()).counts["1.linear"]["ac"] == 4 * 11 * 5


def test_graded_spikes_cost_one_accumulate_per_count_and_one_comparison_per_threshold():
    """Linear(3, 2) on graded spikes (counts 2, -1, 3: six row additions or subtractions per output) and a
    bipolar 3-level LIF: 3 + 3 comparisons per update besides its add and shift; the firing count is sum |s|."""
    fc = nn.Linear(3, 2)
    model = InBlock("mlp", nn.Sequential(fc, LIF(levels=3, bipolar=True, v_threshold=0.5)))
    x = torch.tensor([[[2.0, -1.0, 3.0]]])  # T = 1, one token
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, -2.0, 0.0]]))  # currents 3.5 and 2: h = 1.75 and 1
        fc.bias.zero_()
    ops = count_ops(model, x)
    assert ops.total("ac") == (2 + 1 + 3) * 2 and ops.total("ac_fanout") == (2 + 1 + 3) * 2
    assert ops.total("cmp") == 2 * (3 + 3) and ops.total("shift") == 2
    assert ops.firing == {"blocks.0.mlp.1": (3 + 2, 2)}  # h = 1.75 crosses 0.5, 1.0, 1.5; h = 1 crosses 0.5, 1.0


def test_a_product_of_graded_operands_costs_the_coincidences_of_their_planes():
    """Graded q and k (counts up to 3): q.k costs sum |q_i| |k_i| accumulates per pair (their thermometer planes'
    coincidences); with a binary operand, one accumulate per non-zero pair as before."""
    q = torch.tensor([[[2.0, 0, 1], [3.0, 1, 0]]])  # (1, 2, 3)
    k = torch.tensor([[[1.0, 2, 2], [0.0, 3, 1]]])
    ops = count_ops(InBlock("attn", CoincidenceAttention()), torch.stack([q, k, (k > 0).float()]))
    # scores: pairs (i, j) sum_c |q_ic| |k_jc|: q0.k0 = 2 + 0 + 2, q0.k1 (masked: future), q1.k0 = 3 + 2, q1.k1 = 3
    assert ops.place("block0.attention.scores")["ac"] == 4 + 5 + 3
    # A V: the integer scores (4; 5, q1.k1 = 3) times binary v: one accumulate per non-zero pair: v0 has 3 ones
    # (row 0 reads v0; row 1 reads v0 and v1, which has 2)
    assert ops.place("block0.attention.values")["ac"] == 3 + 3 + 2


def test_every_step_figure_charges_time_invariant_work_at_each_timestep():
    """The report's every-step totals charge block 0's Q/K/V (whose embedding input repeats over T = 4) four times:
    they exceed the once-figures by exactly three more steps of that work; at T = 1 the two agree."""
    model = tiny("spikedecoder", timesteps=4)
    r = energy_report(model, ids())
    once = count_ops(model, ids()).place("block0.attention.qkv")
    every = count_ops(model, ids(), invariant_once=False).place("block0.attention.qkv")
    assert every["ac"] == 4 * once["ac"] and every["add"] == 4 * once["add"]
    tokens = r["tokens"]
    assert r["synaptic_pj_per_token_every_step"] == pytest.approx(
        r["synaptic_pj_per_token"] + 3 * once["ac"] * 0.9 / tokens, rel=1e-12
    )
    extra = 3 * (once["ac"] + once["add"]) * 0.9 / tokens  # and the LayerNorms after them, three more times too
    assert r["total_pj_per_token_every_step"] > r["total_pj_per_token"] + extra
    r1 = energy_report(tiny("spikedecoder", timesteps=1), ids())
    assert r1["total_pj_per_token_every_step"] == pytest.approx(r1["total_pj_per_token"], rel=1e-12)


def test_firing_rates_equal_the_spikes_the_layers_emit():
    model = tiny()
    seen: dict[str, list[float]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=name: seen.setdefault(n, []).extend([out.sum(), out.numel()]))
        for name, m in model.named_modules()
        if isinstance(m, LIF)
    ]
    with torch.no_grad():
        model(ids())
    for h in hooks:
        h.remove()
    rates = count_ops(model, ids()).firing_rates()
    assert set(rates) == set(seen)
    for name, (spikes, n) in seen.items():
        assert rates[name] == pytest.approx(float(spikes) / n)
    assert any(r > 0 for r in rates.values())


def test_ann_macs_match_the_closed_form():
    model = tiny("ann")
    b, s, e, v, h, layers = 2, 16, 32, V, 2, 2
    d, pairs = e // h, b * h * s * (s + 1) // 2
    per_block = 2 * b * s * 2 * e + b * s * e * 3 * e + 2 * pairs * d + b * s * e * e + 2 * b * s * e * 4 * e
    expected = layers * per_block + b * s * 2 * e + b * s * e * v  # + head LayerNorm and projection
    ops = count_ops(model, ids(b, s))
    assert ops.total("mac") == expected
    assert ops.total("ac") == 0


# ---------------------------------------------------------------------------------------------- whole models
VARIANTS = [
    ("ann", {}),
    ("spiking-attention", {}),
    ("spiking-attention-mlp", {}),
    ("spikedecoder", {}),
    ("spikedecoder", {"norm": "power"}),
    ("spikedecoder", {"norm": "batch", "residual": 1, "first_attn_lif": True}),
    ("spikedecoder", {"residual": 2, "av_norm": True, "head_combine": "concat"}),
    ("spikedecoder", {"token_code": "binary", "position_code": "sinusoidal", "combine": "concat"}),
    ("spikedecoder", {"attn_window": 4}),
    ("spikedecoder", {"attn_window": [2, 4], "av_norm": True, "combine": "concat"}),
    ("spikedecoder", {"attn_window": [2, 0], "attn_norm": "coincidence", "attn_offset": True, "attn_key_conv": True}),
    ("spikedecoder", {"attn_window": [2, 0], "attn_norm": "coincidence", "attn_power": 2}),
    ("spikedecoder", {"residual": 2, "attn_window": [0, 3], "attn_norm": "coincidence", "attn_offset": True}),
    ("spiking-attention", {"encoding": "rate"}),
    ("spikedecoder", {"token_conv": 4, "mlp_conv": 2, "attn_key_conv": True}),
    ("ann", {"attn_window": [2, 0], "token_conv": 3, "mlp_conv": 2}),
    ("ann", {"attn_window": 2, "token_conv": 3, "mlp_conv": 2, "conv_mode": "channel"}),
    ("spikedecoder", {"token_conv": 3, "mlp_conv": 2, "attn_key_conv": True, "conv_mode": "channel", "norm": "batch"}),
    ("spikedecoder", {"spike_levels": 3, "timesteps": 1, "token_conv": 2}),
    ("spiking-attention-mlp", {"spike_levels": 2, "bipolar": True}),
    ("spikedecoder", {"learnable_tau": "channel"}),
    ("spikedecoder", {"learnable_tau": "layer", "residual": 2, "decay_input": False}),
]


@pytest.mark.parametrize("preset,overrides", VARIANTS)
def test_every_operation_is_priced_and_placed(preset, overrides):
    ops = count_ops(tiny(preset, **overrides), ids(1, 8))
    assert ops.unpriced == {}
    known = {
        "embedding", "head", "head.lif", "head.norms", "residual", "attention.qkv", "attention.scores",
        "attention.values", "attention.state", "attention.proj", "attention.norms", "attention.lif", "mlp.fc1",
        "mlp.fc2", "mlp.act", "mlp.norms", "mlp.lif",
    }  # fmt: skip
    assert {subblock(p) for p in ops.counts} <= known
    assert ops.total("ac_fanout") >= ops.total("ac")
    spiking = preset != "ann"
    assert (ops.total("ac") > 0) == spiking
    learned = overrides.get("learnable_tau", "none") != "none"
    assert (ops.total("shift") > 0) == (spiking and not learned)  # tau = 2: every membrane update leaks by a shift
    assert (ops.total("lif") > 0) == (spiking and learned)  # a learned decay: a multiply-accumulate instead


class Decay(nn.Module):
    """A new op inside attention (as an attention-state decay would be): it declares its place, nothing else.
    A factor of 1 keeps every spike after it unchanged, so only its own multiplies are new."""

    energy_place = "decay"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class Wrapper(nn.Module):
    """The same model under other module names (net.blocks.0.attn...): names must not decide the places."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)


def test_places_come_from_declarations_not_from_module_names():
    model = tiny()
    plain = count_ops(model, ids())
    assert count_ops(Wrapper(model), ids()).counts == plain.counts
    # a new module inside attention, under a name the counter has never seen, is charged where it declares
    block = model.blocks[0].attn
    block.attn_lif = nn.Sequential(Decay(), block.attn_lif)
    ops = count_ops(model, ids())
    t, (b, s), e = model.config.timesteps, ids().shape, model.config.n_embd
    assert ops.place("block0.attention.decay") == {"mul": t * b * s * e}
    assert ops.place("block0.attention.lif") == plain.place("block0.attention.lif")
    assert {p: k for p, k in ops.counts.items() if p != "block0.attention.decay"} == plain.counts


def test_counts_do_not_depend_on_batch_invariant_mode():
    model = tiny()
    with batch_invariant(True):
        chunked = count_ops(model, ids())
    assert chunked.counts == count_ops(model, ids()).counts


def test_layer_norm_model_costs_more_than_folded_power_norm_and_the_report_shows_where():
    ln = energy_report(tiny(norm="layer", av_norm=False), ids())  # the norm on A V follows no Linear: it never folds
    pn = energy_report(tiny(norm="power", av_norm=False), ids())
    assert pn["folded_norms"] == 2 * 6  # q, k, v, proj, fc1, fc2 per block
    assert ln["folded_norms"] == 0
    assert ln["total_pj_per_token"] > pn["total_pj_per_token"]
    for name in ("attention.norms", "mlp.norms"):
        assert ln["per_subblock_pj"][name] > 0
        assert pn["per_subblock_pj"].get(name, 0.0) == 0.0
    unfolded = energy_report(tiny(norm="power", av_norm=False), ids(), fold=False)
    assert unfolded["per_subblock_pj"]["mlp.norms"] > 0


def test_energy_prices_and_report():
    assert (PRESETS["fp32"].mac, PRESETS["fp32"].ac) == (4.6, 0.9)
    assert (PRESETS["fp16"].mac, PRESETS["fp16"].ac) == (1.5, 0.4)
    assert (PRESETS["int8"].mac, PRESETS["int8"].ac) == (0.23, 0.03)
    lin = nn.Linear(4, 3)
    spikes = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])  # 9 AC, 6 adds, 9 weight reads; 8 "tokens" (numel)
    for name, energy in PRESETS.items():
        r = energy_report(lin, spikes, name)
        assert r["total_pj_per_token"] == pytest.approx((9 + 6) * energy.ac / 8)
        assert r["input_spike_density"] == {"model": 3 / 8}
        with_memory = energy_report(lin, spikes, name, memory=True)
        assert with_memory["total_pj_per_token"] == pytest.approx(((9 + 6) * energy.ac + 9 * energy.mem) / 8)
    dense = energy_report(lin, torch.full((2, 4), 0.5), "fp32")
    assert dense["total_pj_per_token"] == pytest.approx((24 * 4.6 + 6 * 0.9) / 8)
    json.dumps(dense)  # JSON-ready


def ann_hand_count(b: int, s: int, e: int, h: int, v: int, layers: int) -> dict[str, int]:
    """Every operation of the ANN preset's forward on b sequences of s tokens, by kind, from the architecture alone:
    pre-LayerNorm blocks (softmax attention, GELU MLP of width 4e), summed token + position embeddings, a final
    LayerNorm and the vocabulary projection. Weight reads (`mem`) are left out (priced 0 without memory=True)."""
    rows, d, pairs, hidden = b * s, e // h, b * h * s * (s + 1) // 2, 4 * e
    layer_norm = {"add": rows * 2 * e, "mac": rows * 2 * e, "mul": rows * (e + 2), "sqrt": rows, "div": rows}
    per_block = [
        layer_norm,
        layer_norm,
        {"mac": rows * e * 3 * e, "add": rows * 3 * e},  # qkv
        {"mul": rows * e + pairs, "mac": pairs * d, "cmp": pairs, "add": 2 * pairs, "exp": pairs, "div": b * h * s},
        {"mac": pairs * d},  # A V
        {"mac": rows * e * e, "add": rows * e},  # proj
        {"mac": rows * e * hidden, "add": rows * hidden},  # fc1
        {"exp": rows * hidden, "mul": 3 * rows * hidden, "add": rows * hidden},  # GELU (erf form)
        {"mac": rows * hidden * e, "add": rows * e},  # fc2
        {"add": 2 * rows * e},  # two residual adds
    ]
    model = per_block * layers + [{"add": rows * e}, layer_norm, {"mac": rows * e * v, "add": rows * v}]
    total: dict[str, int] = {}
    for part in model:
        for kind, n in part.items():
            total[kind] = total.get(kind, 0) + n
    return total


@pytest.mark.parametrize("preset", ["fp32", "int8"])
def test_ann_report_total_is_the_hand_count_priced(preset):
    """The report's total and per-kind energies against an independent count priced by hand (Horowitz 45 nm:
    add/cmp = ac, mul = mac - ac, exp = 8 mac, div and sqrt = 4 mac)."""
    r = energy_report(tiny("ann"), ids(), preset)
    ops = ann_hand_count(b=2, s=16, e=32, h=2, v=V, layers=2)
    mac, ac = PRESETS[preset].mac, PRESETS[preset].ac
    price = {"mac": mac, "add": ac, "cmp": ac, "mul": mac - ac, "exp": 8 * mac, "div": 4 * mac, "sqrt": 4 * mac}
    assert {k: n for k, n in r["kind_counts"].items() if n and k != "mem"} == ops
    hand = sum(n * price[k] for k, n in ops.items()) / (2 * 16)
    assert r["total_pj_per_token"] == pytest.approx(hand, rel=1e-12)
    assert r["total_pj_per_token_fanout"] == pytest.approx(hand, rel=1e-12)  # no spikes: nothing to fan out
    for kind, n in ops.items():
        assert r["per_kind_pj"][kind] == pytest.approx(n * price[kind] / 32, rel=1e-12)


def test_spiking_report_total_is_the_hand_count_priced():
    """Linear(4, 3) -> LIF -> Linear(3, 2) on known spikes (T = 2 steps of 2 rows), weights chosen so that the LIF
    pattern is known: every number below is counted by hand."""
    fc1, fc2 = nn.Linear(4, 3), nn.Linear(3, 2)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [0, 0, 0, 3.0], [0, 0, 0, 0]]))
        fc1.bias.zero_()
        fc2.weight.fill_(1.0)
        fc2.bias.zero_()
    model = InBlock("mlp", nn.Sequential(fc1, LIF(tau=2.0, v_threshold=1.0), fc2))
    x = torch.tensor([[[1.0, 0, 1, 0], [0, 0, 0, 1]], [[1.0, 1, 0, 0], [0, 0, 0, 0]]])  # 5 spikes
    # fc1: 5 spikes x 3 outputs = 15 AC, 4 rows x 3 bias adds = 12. Currents: t=0 (3,0,0),(0,3,0); t=1 (3,0,0),(0,0,0)
    # LIF (h = v + (x - v) / 2): 3 -> 1.5 fires; t=1 row 0 fires again (1.5), row 1's unit 1 was reset to 0 and gets
    # 0: spikes t=0 (1,0,0),(0,1,0); t=1 (1,0,0),(0,0,0) = 3 spikes; 12 updates, each an add, a shift (tau = 2)
    # and a comparison
    # fc2: 3 spikes x 2 outputs = 6 AC, 4 rows x 2 bias adds = 8
    ops = {"ac": 15 + 6, "add": 12 + 12 + 8, "cmp": 12, "shift": 12}
    r = energy_report(model, x, "fp32")
    tokens = x.numel()  # not a SpikeDecoder: every input entry is a token
    assert r["tokens"] == tokens
    assert {k: n for k, n in r["kind_counts"].items() if n and k not in ("mem", "ac_fanout")} == ops
    assert r["firing_rates"] == {"blocks.0.mlp.1": 3 / 12}
    hand = ((15 + 6) * 0.9 + 32 * 0.9 + 12 * 0.9 + 12 * 0.9) / tokens
    assert r["total_pj_per_token"] == pytest.approx(hand, rel=1e-12)
    assert r["synaptic_pj_per_token"] == pytest.approx(21 * 0.9 / tokens, rel=1e-12)


def test_report_sums_and_comparison():
    snn, ann = energy_report(tiny(), ids()), energy_report(tiny("ann"), ids())
    for r in (snn, ann):
        assert r["tokens"] == 32 and r["window"] == 16
        assert sum(r["per_subblock_pj"].values()) == pytest.approx(r["total_pj_per_token"])  # a partition of places
    assert set(snn["firing_rates"]) and not ann["firing_rates"]
    c = compare_reports(snn, ann)
    assert c["saving_percent"] == pytest.approx(100 * (1 - snn["total_pj_per_token"] / ann["total_pj_per_token"]))
    # the matrix products alone: ANN MACs and SNN ACs of the linear/attention products, by hand from the kinds
    ann_products = sum(r["kind"] == "mac" for r in count_ops(tiny("ann"), ids()).products)
    assert ann_products == 2 * 6 + 1  # qkv, scores, values, proj, fc1, fc2 per block, and the head
    assert snn["synaptic_pj_per_token"] == pytest.approx(snn["per_kind_pj"]["ac"])  # every SNN product is on spikes
    assert ann["synaptic_pj_per_token"] < ann["per_kind_pj"]["mac"]  # LayerNorm MACs are not synaptic
    assert c["saving_percent_synaptic"] > c["saving_percent"]
    assert c["per_subblock_pj"]["attention.qkv"]["ann"] > c["per_subblock_pj"]["attention.qkv"]["snn"] > 0
    with pytest.raises(ValueError, match="same energy preset"):
        compare_reports(snn, energy_report(tiny("ann"), ids(), "int8"))
    with pytest.raises(ValueError, match="unknown energy preset"):
        energy_report(tiny(), ids(), "fp64")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_energy_table_json_and_plot(tmp_path, capsys):
    from spikedecoder.cli import main
    from spikedecoder.data import CharTokenizer
    from spikedecoder.rundir import save_checkpoint

    text = "to be, or not to be: that is the question. whether tis nobler in the mind to suffer\n" * 40
    (tmp_path / "text.txt").write_text(text)
    tok = CharTokenizer.from_text(text)
    meta = {"train": {"data": str(tmp_path / "text.txt"), "val_frac": 0.1, "test_frac": 0.1}}
    for preset in ("spikedecoder", "ann"):
        torch.manual_seed(0)
        cfg = SpikeDecoderConfig.from_preset(
            preset, vocab_size=tok.vocab_size, max_len=16, n_layer=1, n_head=2, n_embd=16
        )
        save_checkpoint(tmp_path / preset, SpikeDecoder(cfg).eval(), tok, meta)

    png = tmp_path / "energy.png"
    snn_dir, ann_dir = str(tmp_path / "spikedecoder"), str(tmp_path / "ann")
    assert main(["energy", snn_dir, "--baseline", ann_dir, "--windows", "2", "--json", "--plot", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["tokens"] == 2 * 16 and result["model"]["firing_rates"]
    c = result["comparison"]
    assert c["ann_pj_per_token"] == pytest.approx(result["baseline"]["total_pj_per_token"])
    decode = [result[k]["decode"]["pj_per_token"] for k in ("model", "baseline")]
    assert c["decode_saving_percent"] == pytest.approx(100 * (1 - decode[0] / decode[1]))
    assert png.stat().st_size > 10_000

    assert main(["energy", snn_dir, "--baseline-preset", "ann", "--windows", "1", "--preset", "fp16"]) == 0
    table = capsys.readouterr().out
    assert "saving:" in table and "attention.qkv" in table and "firing rates" in table and "fp16" in table
    assert "decoding step" in table and "incremental decoding (one cached step per token):" in table


# ---------------------------------------------------------------------------------------------- incremental decoding
def test_ann_decoding_steps_grow_by_one_keys_attention_per_position():
    """Softmax attention's cached step reads one more key per position: each step costs exactly one key's
    attention math more than the last (a score, softmax on it, its value; the cached keys are not rescaled), per
    head and layer."""
    model = tiny_model("ann")
    idx = ids(batch=3, length=16)
    r = decode_report(model, idx)
    steps = r["step_pj"]
    assert r["positions"] == [8, 15] and len(steps) == 8 and r["pj_per_token"] == pytest.approx(sum(steps) / 8)
    p, cfg = PRESETS["fp32"].prices(), model.config
    d = cfg.n_embd // cfg.n_head
    per_key = cfg.n_layer * cfg.n_head * (2 * d * p["mac"] + p["mul"] + p["cmp"] + 2 * p["add"] + p["exp"])
    growth = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert growth == pytest.approx([per_key] * len(growth), rel=1e-9)  # the cache is used, nothing is recomputed


@pytest.mark.parametrize("codes", [{}, {"encoding": "rate", "token_code": "float"}])  # rate: steps draw spikes
def test_step_energy_is_the_decoding_step_and_leaves_the_cache_alone(codes):
    model = tiny_model("spikedecoder", **codes)
    idx = ids(batch=2, length=16)
    torch.manual_seed(0)
    steps = decode_report(model, idx)["step_pj"]
    counted = deployed(model)
    cache = counted.new_cache()
    torch.manual_seed(0)
    with torch.no_grad():
        counted(idx[:, :8], cache)
    before = [dict(layer) for layer in cache.layers]
    rng = torch.get_rng_state()
    one = step_energy(counted, idx[:, 8:9], cache)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert cache.length == 8 and all(  # so is the cache
        all(torch.equal(layer[k], old[k]) for k in old) for layer, old in zip(cache.layers, before, strict=True)
    )
    assert one.tokens == 2 and set(one.firing) and all(0 <= f <= 1 for f in one.firing.values())
    assert one.pj == pytest.approx(steps[0] * 2)  # the report's first cached step, B = 2 windows at once


# ---------------------------------------------------------------------------------------------- SpikingJelly
def spikingjelly_counters():
    pytest.importorskip("spikingjelly")
    from importlib.metadata import version

    if int(version("spikingjelly").split(".")[0]) < 2:
        pytest.skip("the op counter needs spikingjelly >= 2")
    return pytest.importorskip("spikingjelly.activation_based.op_counter")


# make run's spikedecoder at tiny width: configs/run.toml's own preset section, so the check follows the shipped config
MAKE_RUN = {
    **tomllib.loads((Path(__file__).parents[1] / "configs" / "run.toml").read_text())["presets"]["spikedecoder"],
    "lif_backend": "fused",
}


def kill_half_the_gelus(model: SpikeDecoder) -> None:
    """A very negative fc1 bias on half the hidden units: GELU returns exactly 0 there, as it does for some units of
    a trained ANN (1.7 % of fc2's inputs in make run's ANN)."""
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.bias[::2] = -40.0


@pytest.mark.parametrize(
    "preset,overrides,dead_gelus",
    [
        ("spikedecoder", {"timesteps": 4, "spike_levels": 1, "qkv_levels": 1}, False),  # binary spikes at T = 4
        ("ann", {}, False),
        ("ann", {}, True),
        ("spikedecoder", {"residual": 2}, False),
        ("spikedecoder", MAKE_RUN, False),
    ],
)
def test_linear_and_matmul_counts_agree_with_spikingjelly(preset, overrides, dead_gelus):
    """SpikingJelly counts spike x weight as nnz * fan-out, spike x spike as the exact pairs, float x float as
    dense m*k*n, and ignores causal masks; compare ours under the same conventions on the same forward.

    Two rules differ: we skip an exact zero of a float activation (no multiply is needed), SpikingJelly counts it.
    So a MAC product is compared by its dense size, and ours is checked to be that size scaled by the input's
    non-zero fraction. And we charge a Linear on a time-invariant input (the direct-encoded embedding) for one step,
    as the event engine runs it; its record says how many identical steps it stands for (`repeats`)."""
    oc = spikingjelly_counters()
    model, x = tiny(preset, **overrides), ids()
    if dead_gelus:
        kill_half_the_gelus(model)
    synops, macs = oc.SynOpCounter(), oc.MACCounter()
    with torch.no_grad(), oc.DispatchCounterMode([synops, macs]):
        model(x)
    sj = {kind: counter.get_counts()["Global"] for kind, counter in (("ac", synops), ("mac", macs))}
    sj_linear = {kind: sum(v for op, v in c.items() if "mm.default" in str(op) and "bmm" not in str(op))
                 for kind, c in sj.items()}  # fmt: skip

    ops = count_ops(model, x, skip_masked=False)
    linear = [r for r in ops.products if r["weight"]]
    ours_linear = {kind: sum((r["dense"] if kind == "mac" else r["charged"]) * r["repeats"] for r in linear
                             if r["kind"] == kind) for kind in ("ac", "mac")}  # fmt: skip
    assert ours_linear == sj_linear
    for r in linear:
        if r["kind"] == "mac":  # the zero-skipping rule, exactly
            assert r["charged"] * r["input_size"] == r["dense"] * r["input_nnz"]
    skipped = sum(r["dense"] - r["charged"] for r in linear if r["kind"] == "mac")
    assert (skipped > 0) == dead_gelus, "exact zeros reach a float Linear only where GELU outputs were killed"

    def sj_rule(r: dict) -> int:  # graded spike counts are not spikes to SpikingJelly: it counts them densely
        if r["kind"] == "mac" or not any(r["binary"]):
            return r["dense"]
        return r["computed"] if all(r["binary"]) else r["fanout"]

    ours = sum(sj_rule(r) * r["repeats"] for r in ops.products)
    once = [r for r in linear if r["repeats"] > 1]
    repeated = preset != "ann" and model.config.timesteps > 1  # at T = 1 nothing repeats
    assert bool(once) == repeated, "the spike-coded embedding is the same at every step: charged once"
    # a third rule: SpikingJelly charges the BatchNorm it sees run; we fold it into its Linear (no work at inference)
    total = sum(v for c in sj.values() for op, v in c.items() if "batch_norm" not in str(op))
    assert total > 0
    assert math.isclose(ours, total, rel_tol=0.01)
