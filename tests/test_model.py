"""The model: {0,1} inputs wherever the mode says so, a first block that fires, causality for every preset, the
BatchNorm/PowerNorm fold, the fused LIF backend in a model, and clear errors for bad configs and inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.overrides import TorchFunctionMode

from spikedecoder import ConfigError, SpikeDecoder, SpikeDecoderConfig
from spikedecoder.attention import SpikingSelfAttention
from spikedecoder.config import PRESETS
from spikedecoder.layers import Linear, LinearNorm
from spikedecoder.mlp import SpikingMLP
from spikedecoder.neurons import LIF
from spikedecoder.norms import PowerNorm, SeqBatchNorm

V, L = 23, 16
PRESET_NAMES = list(PRESETS)
# every preset, plus the spiking residual degrees where the config allows them
MODES = [(p, {"residual": 0}) for p in PRESET_NAMES]
MODES += [(p, {"residual": r}) for p in ("spiking-attention-mlp", "spikedecoder") for r in (1, 2)]
MODES += [("spikedecoder", {"residual": 0, "attn_window": 4, "av_norm": True})]


def make_model(preset: str = "spikedecoder", seed: int = 0, **overrides) -> SpikeDecoder:
    """The `spikedecoder` preset here as binary spikes at T = 4, the model whose spike semantics these tests state
    (its graded form is tested where decoding, events and energy are)."""
    binary = dict(timesteps=4, spike_levels=1, qkv_levels=1) if preset == "spikedecoder" else {}
    model = tiny_model(preset, seed, **(dict(vocab_size=V, max_len=L) | binary | overrides))
    return model.train()  # as constructed (tiny_model returns eval mode)


def tokens(batch: int = 3, length: int = L, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def expected_binary_linears(model: SpikeDecoder) -> dict[str, Linear]:
    """The Linear layers whose input is spikes by construction: those after a LIF (or a spike embedding)."""
    found: dict[str, Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, SpikingSelfAttention):
            for part in ("q", "k", "v", "proj"):
                found[f"{name}.{part}.linear"] = getattr(module, part).linear
        elif isinstance(module, SpikingMLP):
            found[f"{name}.fc1.linear"] = module.fc1.linear
            found[f"{name}.fc2.linear"] = module.fc2.linear
    if model.head.on_spikes:
        found["head.out"] = model.head.out
    if model.embed.in_proj is not None and model.config.spike_embedding:
        found["embed.in_proj"] = model.embed.in_proj
    return found


class MatmulRecorder(TorchFunctionMode):
    """Records the operands of every matmul and linear call made inside the `with` block."""

    FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, F.linear}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FUNCS:
            self.calls.append((getattr(func, "__name__", str(func)), args[0].detach(), args[1].detach()))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- spikes where promised
@pytest.mark.parametrize(("preset", "mode"), MODES)
def test_layers_after_a_lif_receive_only_spikes(preset: str, mode: dict) -> None:
    model = make_model(preset, **mode).train()
    targets = expected_binary_linears(model)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = [
        layer.register_forward_pre_hook(lambda _, inputs, name=name: seen[name].append(inputs[0].detach()))
        for name, layer in targets.items()
    ]
    try:
        with torch.no_grad():
            model(tokens())
    finally:
        for h in handles:
            h.remove()
    has_lif = any(isinstance(m, LIF) for m in model.modules())
    assert has_lif == (preset != "ann")
    if preset == "ann":
        assert not targets
        return
    assert targets, "a spiking preset must have layers fed by spikes"
    for name, inputs in seen.items():
        assert inputs, f"{name} was never called"
        for x in inputs:
            assert is_binary(x), f"{name} received non-binary input (values {x.unique()[:6].tolist()})"
    # the ladder: dense layers of the float parts must stay float
    if model.config.mlp == "gelu":
        assert not any(isinstance(m, SpikingMLP) for m in model.modules())


@pytest.mark.parametrize(("preset", "mode"), [m for m in MODES if m[0] != "ann"])
def test_attention_matmuls_multiply_spikes(preset: str, mode: dict) -> None:
    """Q K^T multiplies two spike maps; A V multiplies integer coincidence counts (degree 2: spikes) by spikes."""
    model = make_model(preset, **mode).train()
    recorders = []

    def pre(module, inputs):
        recorders.append(MatmulRecorder())
        recorders[-1].__enter__()

    def post(module, inputs, output):
        recorders[-1].__exit__(None, None, None)

    handles = []
    for m in model.modules():
        if isinstance(m, SpikingSelfAttention):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(tokens())
    finally:
        for h in handles:
            h.remove()
    assert len(recorders) == model.config.n_layer
    for rec in recorders:
        matmuls = [(a, b) for name, a, b in rec.calls if name != "linear"]
        paths = 2 if model.blocks[0].attn.long and model.blocks[0].attn.local and mode["residual"] != 2 else 1
        assert len(matmuls) == 2 * paths, [c[0] for c in rec.calls]  # Q K^T and A V per path (window, whole)
        for (q, k_t), (scores, v) in zip(matmuls[::2], matmuls[1::2], strict=True):
            assert is_binary(q) and is_binary(k_t) and is_binary(v)
            assert torch.equal(scores, scores.round()) and scores.min() >= 0
            if mode["residual"] == 2:
                assert is_binary(scores)


def test_degree_2_makes_every_matmul_input_binary() -> None:
    """SPEC section 4: with spiking residual degree 2 every matmul and Linear in the whole model multiplies spikes."""
    model = make_model("spikedecoder", residual=2).train()
    with torch.no_grad(), MatmulRecorder() as rec:
        model(tokens())
    linears = [a for name, a, _ in rec.calls if name == "linear"]
    matmuls = [(a, b) for name, a, b in rec.calls if name != "linear"]
    assert len(matmuls) == 2 * model.config.n_layer and len(linears) > 10
    assert all(is_binary(a) for a in linears), "a Linear received a non-binary activation"
    assert all(is_binary(a) and is_binary(b) for a, b in matmuls), "a matmul operand is not binary"


# ---------------------------------------------------------------------------------------------- first block fires
@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("spikedecoder", dict()),
        ("spikedecoder", dict(residual=2)),
        ("spikedecoder", dict(token_code="onehot", position_code="onehot", combine="concat")),
        ("spikedecoder", dict(token_code="binary", position_code="binary", combine="concat")),
        ("spikedecoder", dict(token_code="binary", position_code="sinusoidal", combine="concat")),
        (
            "spikedecoder",
            dict(vocab_size=16, max_len=16, token_code="onehot", position_code="onehot", combine="concat"),
        ),
        ("spikedecoder", dict(norm="batch")),
        ("spiking-attention", dict()),
        ("spikedecoder", dict(token_code="binary", position_code="binary", combine="concat", encoding="rate")),
    ],
)
def test_first_block_receives_and_emits_spikes(preset: str, overrides: dict) -> None:
    """SPEC section 2 pitfall: binary embeddings must not pass through another LIF (it would never fire)."""
    model = make_model(preset, **overrides).train()  # BatchNorm: batch statistics, as in training
    attn = model.blocks[0].attn
    if model.embed.emits_spikes:
        assert attn.in_lif is None, "spikes from the embedding must enter the first block directly"
    else:
        assert attn.in_lif is not None
    captured: dict[str, torch.Tensor] = {}
    handles = [attn.q.linear.register_forward_pre_hook(lambda _, i: captured.__setitem__("input", i[0]))]
    for name in ("q_lif", "k_lif", "v_lif"):
        lif = getattr(attn, name)
        handles.append(lif.register_forward_hook(lambda _, i, o, name=name: captured.__setitem__(name, o)))
    with torch.no_grad():
        model(tokens(length=overrides.get("max_len", L), vocab=overrides.get("vocab_size", V)))
    for h in handles:
        h.remove()
    x = captured["input"]
    assert is_binary(x)
    assert 0.01 < x.mean() < 0.99, f"first block input firing rate {x.mean():.3f}"
    for name in ("q_lif", "k_lif", "v_lif"):
        assert captured[name].sum() > 0, f"blocks[0].attn.{name} is silent"


# ---------------------------------------------------------------------------------------------- causality
CAUSAL_VARIANTS = [(p, {}) for p in PRESET_NAMES] + [
    ("spikedecoder", dict(residual=1)),
    ("spikedecoder", dict(residual=2)),
    ("spikedecoder", dict(head_combine="concat", first_attn_lif=True)),
    ("spikedecoder", dict(norm="batch", residual=1, v_threshold=0.3)),
    ("spikedecoder", dict(norm="power", head_combine="last")),
    ("spikedecoder", dict(token_code="binary", position_code="sinusoidal", combine="concat", encoding="direct")),
    ("spikedecoder", dict(attn_window=4, av_norm=True)),
    ("spikedecoder", dict(attn_window=3, residual=2, norm="power")),
]


# At the default scale (0.125) and threshold (1) the attention LIF of an untrained tiny model (d_h=16) never fires, so
# no token would reach another and a missing mask would go unnoticed: the causal tests use an attention that mixes.
MIXING = dict(attn_scale=1.0, v_threshold=0.5)


def mixing_model(preset: str, **overrides) -> SpikeDecoder:
    model = make_model(preset, **(overrides if preset == "ann" else MIXING | overrides))
    randomise_norms(model, affine=False)  # BatchNorm/PowerNorm running statistics, else the eval model is silent
    return model


@pytest.mark.parametrize(("preset", "overrides"), CAUSAL_VARIANTS)
def test_changing_a_future_token_never_changes_earlier_logits(preset: str, overrides: dict) -> None:
    model = mixing_model(preset, **overrides)
    idx = tokens()
    with torch.no_grad():
        base = model(idx)
        for j in (0, L // 2, L - 1):
            changed = idx.clone()
            changed[:, j] = (changed[:, j] + 1 + torch.arange(3)) % V
            out = model(changed)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert not torch.equal(out[:, j], base[:, j]), "the change must reach its own position"
            if j == 0:  # and, through attention, later positions: the model mixes tokens, so the check has teeth
                assert not torch.equal(out[:, 1:], base[:, 1:]), "no token reaches another: attention is silent"


@pytest.mark.parametrize("norm", ["layer", "batch", "power", "none"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_training_mode_is_causal_for_every_norm(preset: str, norm: str) -> None:
    """Batch statistics (BatchNorm, PowerNorm's warm-up) must not carry a later token into an earlier position while
    training, or the model learns a side channel that inference lacks. Each call starts from the same state, since a
    training forward updates the running statistics (PowerNorm normalises with them after its warm-up)."""
    model = make_model(preset, norm=norm, **({} if preset == "ann" else MIXING)).train()
    if preset != "ann":
        kinds = {"batch": SeqBatchNorm, "power": PowerNorm, "layer": torch.nn.LayerNorm}
        assert norm == "none" or any(isinstance(m, kinds[norm]) for m in model.blocks.modules()), "norm not applied"
    idx = tokens()
    for phase in ("warm-up", "running estimate") if norm == "power" else ("batch statistics",):
        if phase == "running estimate":
            for m in model.modules():
                if isinstance(m, PowerNorm):
                    m.steps.fill_(m.warmup)
        state = copy.deepcopy(model.state_dict())

        def run(ids: torch.Tensor, state: dict = state) -> torch.Tensor:
            model.load_state_dict(state)
            with torch.no_grad():
                return model(ids)

        base = run(idx)
        for j in (L // 2, L - 1):
            changed = idx.clone()
            changed[:, j] = (changed[:, j] + 1 + torch.arange(3)) % V
            out = run(changed)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6, msg=f"{phase}, token {j}")
            assert not torch.equal(out[:, j], base[:, j]), "the change must reach its own position"


def test_spiking_causal_logits_are_exact() -> None:
    """Spike counts are integers, so for the SNN the earlier logits are not just close but bitwise equal."""
    model = mixing_model("spikedecoder")
    idx = tokens()
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 5) % V
    with torch.no_grad():
        out, base = model(changed), model(idx)
    assert torch.equal(out[:, :9], base[:, :9])
    assert not torch.equal(out[:, 9:], base[:, 9:])


# ---------------------------------------------------------------------------------------------- norm fold
def randomise_norms(model: SpikeDecoder, affine: bool = True) -> None:
    """Running statistics from a few training forwards and (affine) random norm weights, as after training."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if affine and isinstance(m, SeqBatchNorm | PowerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
        model.train()
        for seed in range(3):
            model(tokens(seed=seed + 10))
    model.eval()


@pytest.mark.parametrize("norm", ["batch", "power"])
@pytest.mark.parametrize(
    ("preset", "mode"),
    [
        ("spikedecoder", {}),
        ("spikedecoder", {"residual": 2}),
        ("spiking-attention", {}),
        ("spikedecoder", {"av_norm": True}),
    ],
)
def test_folding_batchnorm_and_powernorm_keeps_the_outputs(norm: str, preset: str, mode: dict) -> None:
    model = make_model(preset, norm=norm, **mode)
    randomise_norms(model)
    idx = tokens(batch=4)
    with torch.no_grad():
        before = model(idx)
        pairs = sum(isinstance(m, LinearNorm) for m in model.modules())
        assert model.fold_norms() == pairs > 0
        assert not any(isinstance(m, LinearNorm) and not isinstance(m.norm, torch.nn.Identity) for m in model.modules())
        after = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert model.fold_norms() == 0  # nothing left to fold


def test_fold_needs_eval_mode_and_skips_layernorm() -> None:
    model = make_model(norm="batch").train()
    with pytest.raises(RuntimeError, match=r"running statistics: call model.eval\(\) first"):
        model.fold_norms()
    assert make_model(norm="layer").eval().fold_norms() == 0


# ---------------------------------------------------------------------------------------------- shapes and backends
@pytest.mark.parametrize("combine", ["mean", "sum", "concat", "last"])
@pytest.mark.parametrize("preset", ["spikedecoder", "spiking-attention-mlp"])
def test_logit_shapes_for_every_head_combine(preset: str, combine: str) -> None:
    model = make_model(preset, head_combine=combine)
    logits = model(tokens(batch=2, length=7))
    assert logits.shape == (2, 7, V) and torch.isfinite(logits).all()
    width = 32 * model.config.timesteps if combine == "concat" else 32
    assert model.head.out.in_features == width


@pytest.mark.parametrize("learnable_tau", ["none", "channel"])
def test_fused_lif_backend_gives_the_same_model(learnable_tau: str) -> None:
    """Same logits and gradients, learned thresholds and (learned) membrane decays included."""
    loop = make_model("spikedecoder", n_layer=1, learnable_threshold="channel", learnable_tau=learnable_tau)
    fused = make_model(
        "spikedecoder", n_layer=1, learnable_threshold="channel", learnable_tau=learnable_tau, lif_backend="fused"
    )
    fused.load_state_dict(loop.state_dict())
    idx, target = tokens(), tokens(seed=2)
    losses = []
    for model in (loop, fused):
        logits = model(idx)
        loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
        loss.backward()
        losses.append((logits.detach(), loss.detach()))
    assert torch.equal(losses[0][0], losses[1][0])
    for (name, p_loop), p_fused in zip(loop.named_parameters(), fused.parameters(), strict=True):
        if p_loop.grad is None:
            assert p_fused.grad is None, name
            continue
        torch.testing.assert_close(p_fused.grad, p_loop.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(timesteps=0), r"timesteps \(T\) must be an integer >= 1, got 0"),
        (dict(timesteps=-2), r"timesteps \(T\) must be an integer >= 1, got -2"),
        (dict(n_embd=30, n_head=4), "n_head=4 must divide n_embd=30; pick e.g. n_head=3"),
        (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
        (dict(norm="group"), "norm='group' is not valid; choose one of layer, batch, power, none"),
        (dict(token_code="onehot"), "combine='sum' adds two trained tables.*use combine='concat'"),
        (dict(residual=3), "residual=3 must be 0 .float., 1 or 2"),
        (dict(attn_scale="big"), "attn_scale must be a number or 'auto'"),
        (dict(attn_scale=0.0), "attn_scale must be > 0"),
        (dict(tau=1.0), "tau must be > 1"),
        (dict(learnable_tau="head"), "learnable_tau='head' is not valid; choose one of none, layer, channel"),
        (dict(v_threshold=0), "v_threshold must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(code_dim=0), "code_dim must be >= 1"),
        (dict(lif_backend="cuda"), "lif_backend='cuda' is not valid; choose one of loop, fused"),
    ],
)
def test_bad_configs_name_the_field_and_the_fix(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SpikeDecoderConfig.from_preset("spikedecoder", **overrides)


def test_preset_and_field_errors() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'snn'; choose one of ann, spiking-attention"):
        SpikeDecoderConfig.from_preset("snn")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['n_embed'\]; valid fields: .*n_embd"):
        SpikeDecoderConfig.from_preset("ann", n_embed=64)
    with pytest.raises(ConfigError, match="spiking residual .degree 1/2. needs attention='spiking' and mlp='spiking'"):
        SpikeDecoderConfig.from_preset("spiking-attention", residual=1)


def test_presets_differ_only_where_the_ladder_says() -> None:
    ann, snn = (SpikeDecoderConfig.from_preset(p).to_dict() for p in ("ann", "spikedecoder"))
    attn, mlp = (SpikeDecoderConfig.from_preset(p).to_dict() for p in ("spiking-attention", "spiking-attention-mlp"))
    assert ann["attention"] == "softmax" and ann["mlp"] == "gelu" and ann["timesteps"] == 1
    assert {k for k in ann if ann[k] != attn[k]} == {"attention", "timesteps", "preset"}
    assert {k for k in attn if attn[k] != mlp[k]} == {"mlp", "preset"}
    shared = ("n_layer", "n_head", "n_embd", "max_len", "mlp_ratio", "vocab_size")
    assert all(ann[k] == snn[k] for k in shared)


def test_config_json_round_trip_and_corrupt_file(tmp_path) -> None:
    cfg = SpikeDecoderConfig.from_preset("spikedecoder", n_layer=3, norm="power")
    cfg.save(tmp_path / "c.json")
    assert SpikeDecoderConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"n_layer": 3,')
    with pytest.raises(ConfigError, match="bad.json is not valid JSON .* the checkpoint is corrupt"):
        SpikeDecoderConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("idx", "error", "message"),
    [
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty input .* give at least one token"),
        (torch.zeros(5, dtype=torch.long), ValueError, r"shape \(B, S\), got \(5,\); add a batch dimension"),
        (torch.zeros(1, L + 1, dtype=torch.long), ValueError, f"{L + 1} positions exceed max_len={L}; crop"),
        (torch.full((1, 3), V), ValueError, f"token id {V} is outside the model's vocabulary \\[0, {V}\\)"),
        (torch.full((1, 3), -1), ValueError, "token id -1 is outside the model's vocabulary"),
        (torch.zeros(1, 3), TypeError, "integer token ids, got Tensor torch.float32; encode text"),
    ],
)
def test_bad_inputs_raise_clear_errors(idx, error, message) -> None:
    with pytest.raises(error, match=message):
        make_model()(idx)


def test_cache_positions_count_towards_max_len() -> None:
    model = make_model().eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(batch=1, length=L - 2), cache)
        with pytest.raises(ValueError, match=f"{L + 1} positions exceed max_len={L}"):
            model(tokens(batch=1, length=3), cache)


@pytest.mark.parametrize(
    "stages", [["embedding"], ["qkv"], ["attn_in", "attn_out"], ["mlp_in", "mlp_hidden"], ["head"]]
)
def test_float_stages_replace_exactly_those_spikes_by_floats(stages) -> None:
    """The diagnostic: each named stage emits non-integer floats (relu of its current), every other one spikes."""
    from spikedecoder.layers import FloatStage

    cfg = SpikeDecoderConfig.from_preset(
        "spikedecoder", vocab_size=20, max_len=16, n_layer=2, n_embd=32, timesteps=2, float_stages=stages
    )
    model = SpikeDecoder(cfg).eval()
    outputs: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, LIF | FloatStage) or name == "embed":
            m.register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out))
    with torch.no_grad():
        model(torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(0)))
    stage_of = {"embed": "embedding", "in_lif": "attn_in", "q_lif": "qkv", "k_lif": "qkv", "v_lif": "qkv"}
    stage_of |= {"attn_lif": "attn_out", "hidden_lif": "mlp_hidden", "head.lif": "head"}
    for name, out in outputs.items():
        leaf = "head.lif" if name == "head.lif" else name.split(".")[-1]
        stage = "mlp_in" if name.endswith("mlp.in_lif") else stage_of[leaf]
        integral = bool((out == out.round()).all())
        assert integral != (stage in stages), (name, stage)
