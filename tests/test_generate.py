"""Generation: incremental decoding equals the full recompute (exactly for spiking attention), sliding past max_len,
sampling options, stop strings and argument errors."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_model

from spikedecoder import SpikeDecoder, cli
from spikedecoder.data import CharTokenizer
from spikedecoder.generate import _Detokenizer, generate_ids, generate_text, sample_next
from spikedecoder.layers import batch_invariant
from spikedecoder.norms import PowerNorm, SeqBatchNorm
from spikedecoder.rundir import save_checkpoint

V = 20
TOKENIZER = CharTokenizer.from_text("abcdefghij klmnop\n:!")  # one token per character, V of them


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which on a busy shared CPU makes
    every small op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(preset: str = "spikedecoder", max_len: int = 128, seed: int = 0, **overrides) -> SpikeDecoder:
    """A tiny random model whose neurons really fire, attention included, so that exactness is tested on spikes.

    With random weights and the default threshold 1, Q, K and V fire at ~5%; A V is then a sum of products of three
    such rates, scaled by 0.125, and the attention LIF never fires: the cache would be tested on zeros. A lower
    threshold (0.3) and attention scale (0.5; 2 without a norm) give moderate rates in every residual/norm mode, and
    BatchNorm / PowerNorm get running statistics that match the model's own activations (`calibrate`)."""
    sizes = dict(vocab_size=V, max_len=max_len)
    if preset != "ann":  # without a norm, the coincidence normaliser's weighted mean (<= 1) needs a larger scale
        sizes.update(v_threshold=0.3, attn_scale=2.0 if overrides.get("norm") == "none" else 0.5)
    model = tiny_model(preset, seed, **{**sizes, **overrides})
    spread_decays(model, seed)
    calibrate(model)
    return model.eval()


@torch.no_grad()
def spread_decays(model: SpikeDecoder, seed: int = 0) -> None:
    """Learned membrane decays spread over (0.2, 0.8), as training leaves them: not all 1/tau, the fixed LIF's."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("decay_logit"):
            p.copy_(torch.rand(p.shape, generator=g) * 2.8 - 1.4)


@torch.no_grad()
def calibrate(model: SpikeDecoder, batches: int = 8) -> None:
    """Running statistics of BatchNorm/PowerNorm averaged over several training-mode batches: BatchNorm with
    momentum=None (a cumulative average), PowerNorm through its own warm-up (which averages the batches' second
    moments). Three default EMA steps (momentum 0.1) would leave BatchNorm's near their initial mean 0 / variance
    1, far from the activations, and the model silent."""
    batch_norms = [m for m in model.modules() if isinstance(m, SeqBatchNorm)]
    if not batch_norms and not any(isinstance(m, PowerNorm) for m in model.modules()):
        return
    for m in batch_norms:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(1234)
    model.train()
    for _ in range(batches):
        model(torch.randint(0, V, (4, min(model.config.max_len, 64)), generator=g))
    for m in batch_norms:
        m.momentum = 0.1
    model.eval()


def prompt(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def record_logits(model: SpikeDecoder) -> list[torch.Tensor]:
    """Make the model append the logits of the last position of each forward (the ones generation samples from)."""
    logits: list[torch.Tensor] = []
    forward = model.forward

    def recording(idx: torch.Tensor, cache=None) -> torch.Tensor:
        out = forward(idx, cache)
        logits.append(out[:, -1].clone())
        return out

    model.forward = recording
    return logits


def cached_logits(model: SpikeDecoder, seq: torch.Tensor, prefill: int, chunk: int = 1) -> torch.Tensor:
    """Logits for every position of seq: the first `prefill` tokens at once, then `chunk` tokens at a time."""
    with torch.no_grad(), batch_invariant():
        cache = model.new_cache()
        steps = [model(seq[:, :prefill], cache)]
        steps += [model(seq[:, i : i + chunk], cache) for i in range(prefill, seq.shape[1], chunk)]
    return torch.cat(steps, dim=1)


def assert_uses_context(model: SpikeDecoder, seq: torch.Tensor) -> None:
    """The logits vary along the sequence, and changing the first tokens changes later ones (through attention;
    a whole-context head's weighted mean dilutes one token, so the first eight change)."""
    other = seq.clone()
    other[:, :8] = (other[:, :8] + 1) % V
    with torch.no_grad(), batch_invariant():
        full, changed = model(seq), model(other)
    assert full[0].std(dim=0).max() > 0, "the logits should depend on the tokens, or the test proves little"
    late = seq.shape[1] // 2
    assert not torch.equal(full[:, late:], changed[:, late:]), "attention should carry the context to later tokens"


# ---------------------------------------------------------------------------------------------- exactness
MODES = [("spikedecoder", residual, norm) for residual in (0, 1, 2) for norm in ("layer", "batch", "power", "none")]
OTHER_PRESETS = [("spiking-attention", 0, "layer"), ("spiking-attention-mlp", 0, "layer")]


@pytest.mark.parametrize("preset, residual, norm", MODES + OTHER_PRESETS)
def test_incremental_is_exactly_the_full_recompute(preset: str, residual: int, norm: str) -> None:
    """100 greedy tokens with the cache: each step's logits are bitwise those of the full window's forward (row i
    of a causal forward over seq is the recompute of seq[:i+1]), and greedy decoding of those logits is the output."""
    check_incremental(make_model(preset, max_len=112, residual=residual, norm=norm, timesteps=2))


@pytest.mark.parametrize("conv_mode", ["full", "channel"])
@pytest.mark.parametrize("preset, residual, norm", MODES + OTHER_PRESETS + [("ann", 0, "layer")])
def test_token_convolutions_decode_exactly(preset: str, residual: int, norm: str, conv_mode: str) -> None:
    """Q, K, V reading the last 4 tokens and the MLP the last 3, either as a wider input (full) or as per-channel
    convolutions of their outputs (channel): each layer's decoding state keeps what the convolutions still need,
    and every cached step is bitwise the full forward."""
    model = make_model(
        preset, max_len=112, residual=residual, norm=norm, timesteps=2, token_conv=4, mlp_conv=3, conv_mode=conv_mode
    )
    if preset == "ann":  # softmax attention's step is exact up to its fused kernel's float order
        seq = generate_ids(model, prompt(8), 60, greedy=True)[:, :-1]
        with torch.no_grad(), batch_invariant():
            full = model(seq)
        torch.testing.assert_close(cached_logits(model, seq, prefill=8), full, rtol=1e-5, atol=1e-5)
    else:
        check_incremental(model)
    cache = model.new_cache()
    with torch.no_grad():
        model(prompt(9), cache)
    kept = {k: v.shape[-2] for k, v in cache.layers[1].items() if "shift" in k or "conv" in k}
    if conv_mode == "full":
        assert kept["attn_shift"] == 3 and kept["mlp_shift"] == 2
    elif preset == "ann":
        assert kept == {"qkv_conv": 3, "fc1_conv": 2}, kept
    else:  # the convolutions keep outputs; the inputs are read once (spiking attention: no MLP convolution state
        # where the MLP is a float one)
        assert {kept[k] for k in ("q_conv", "k_conv", "v_conv")} == {3} and "attn_shift" not in kept
        assert kept.get("fc1_conv") == 2 and "mlp_shift" not in kept


@pytest.mark.parametrize("norm", ["layer", "batch", "power", "none"])
@pytest.mark.parametrize("levels, bipolar, timesteps, qkv", [(4, False, 1, 3), (2, True, 2, 1)])
def test_graded_spikes_decode_exactly(norm: str, levels: int, bipolar: bool, timesteps: int, qkv: int) -> None:
    """Graded (and bipolar) spikes where Linears read them, graded Q/K/V in the window and whole-context heads, with
    the token convolutions: cached steps are bitwise the full forward (the counts are small integers, exact in
    float32)."""
    model = make_model(
        max_len=112,
        norm=norm,
        timesteps=timesteps,
        spike_levels=levels,
        bipolar=bipolar,
        qkv_levels=qkv,
        token_conv=2,
        mlp_conv=2,
    )
    check_incremental(model)


def check_incremental(model: SpikeDecoder) -> None:
    idx = prompt(8, batch=2)
    incremental = record_logits(model)
    greedy = generate_ids(model, idx, 100, greedy=True)
    assert len(incremental) == 100
    del model.forward  # stop recording
    with torch.no_grad(), batch_invariant():
        full = model(greedy[:, :-1])[:, 7:]
    assert torch.equal(torch.stack(incremental, dim=1), full)
    assert torch.equal(full.argmax(dim=-1), greedy[:, 8:])
    assert len(set(greedy[:, 8:].flatten().tolist())) > 2, "greedy decoding should not be stuck on one token"
    assert_uses_context(model, greedy)


@pytest.mark.parametrize(
    "preset, residual, norm",
    [MODES[0], *OTHER_PRESETS] + [pytest.param(*mode, marks=pytest.mark.slow) for mode in MODES[1:]],
)
def test_generation_equals_the_per_step_recompute(preset: str, residual: int, norm: str) -> None:
    """The literal reference (incremental=False: one forward of the window per token) gives the same 100 greedy
    tokens and bitwise the same logits at every step."""
    model = make_model(preset, max_len=112, residual=residual, norm=norm, timesteps=2)
    idx = prompt(8, batch=2)
    incremental = record_logits(model)
    greedy = generate_ids(model, idx, 100, greedy=True)
    del model.forward
    recomputed = record_logits(model)
    assert torch.equal(generate_ids(model, idx, 100, greedy=True, incremental=False), greedy)
    assert len(recomputed) == 100 and torch.equal(torch.stack(incremental), torch.stack(recomputed))


def test_sampled_generation_and_chunked_prefill_match_the_recompute() -> None:
    model = make_model(max_len=112, residual=1, norm="power", timesteps=2)
    idx = prompt(8, batch=2)
    sampled = generate_ids(model, idx, 60, seed=0, temperature=1.5, top_k=10)
    assert torch.equal(sampled, generate_ids(model, idx, 60, seed=0, temperature=1.5, top_k=10, incremental=False))
    seq = sampled[:, :-1]
    with torch.no_grad(), batch_invariant():
        full = model(seq)
    for prefill, chunk in ((1, 7), (30, 13), (60, 1)):
        assert torch.equal(cached_logits(model, seq, prefill, chunk), full)


def test_ann_kv_cache_matches_recompute() -> None:
    model = make_model("ann", max_len=112)
    idx = prompt(8)
    greedy = generate_ids(model, idx, 60, greedy=True)
    assert torch.equal(greedy, generate_ids(model, idx, 60, greedy=True, incremental=False))
    seq = greedy[:, :-1]
    with torch.no_grad(), batch_invariant():
        full = model(seq)
    torch.testing.assert_close(cached_logits(model, seq, prefill=8), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [2, [2, 0], [3, 2]])
def test_ann_window_and_token_convolution_match_recompute(window) -> None:
    """The ANN given a window (per head: 0 = whole context) and token convolutions: the cache keeps only what the
    windows need, and cached logits equal the recompute."""
    model = make_model("ann", max_len=112, attn_window=window, token_conv=4, mlp_conv=2)
    seq = generate_ids(model, prompt(8), 60, greedy=True)[:, :-1]
    with torch.no_grad(), batch_invariant():
        full = model(seq)
        cache = model.new_cache()
        model(seq[:, :20], cache)
    torch.testing.assert_close(cached_logits(model, seq, prefill=8), full, rtol=1e-5, atol=1e-5)
    kept = cache.layers[0]["k"].shape[-2]
    assert kept == (20 if window == [2, 0] else max(window if isinstance(window, list) else [window]) - 1)


@pytest.mark.parametrize("preset", ["ann", "spikedecoder"])
@pytest.mark.parametrize("window, conv, mlp_conv", [(2, 1, 1), (2, 4, 1), (3, 2, 3)])
@pytest.mark.parametrize("conv_mode", ["full", "channel"])
def test_a_token_reaches_exactly_as_far_as_windows_and_convolutions_allow(
    preset, window, conv, mlp_conv, conv_mode
) -> None:
    """Per layer a token looks back (window - 1) + (token_conv - 1) + (mlp_conv - 1) tokens, no further, whichever
    form the convolutions take: the ANN given a window and a convolution sees the same neighbourhood as the spiking
    model given them."""
    # binary spikes at T = 4: enough spikes in a random tiny model for a change to travel the whole reach
    binary = dict(attn_key_conv=False, timesteps=4, spike_levels=1, qkv_levels=1)
    extra = binary if preset == "spikedecoder" else {}
    model = make_model(
        preset, max_len=64, attn_window=window, token_conv=conv, mlp_conv=mlp_conv, conv_mode=conv_mode, **extra
    )
    x = prompt(40, batch=2)
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % V
    with torch.no_grad():
        diff = (model(changed) - model(x)).abs().amax(dim=(0, 2))
    reach = model.config.n_layer * ((window - 1) + (conv - 1) + (mlp_conv - 1))
    assert torch.all(diff[:10] == 0) and torch.all(diff[11 + reach :] == 0)
    assert diff[10 + reach] > 0, "the change should reach the last position the neighbourhood allows"


# ---------------------------------------------------------------------------------------------- sliding window
def policy_windows(prompt_len: int, new: int, max_len: int, keep: int) -> list[tuple[int, int]]:
    """The sliding policy, stated: (start, n) of the window seq[start:n] each new token is predicted from. The
    window grows until it would exceed max_len tokens, then restarts from the last `keep` tokens."""
    start, windows = 0, []
    for n in range(prompt_len, prompt_len + new):
        if n - start > max_len:
            start = n - keep
        windows.append((start, n))
    return windows


@pytest.mark.parametrize("prompt_len", [4, 30])  # a prompt that fits, and one longer than max_len=16
def test_windows_follow_the_sliding_policy(prompt_len: int) -> None:
    model = make_model(max_len=16)
    inputs: list[torch.Tensor] = []
    forward = model.forward
    model.forward = lambda idx, cache=None: inputs.append(idx.clone()) or forward(idx, cache)
    out = generate_ids(model, prompt(prompt_len), 30, greedy=True, incremental=False)
    windows = policy_windows(prompt_len, 30, max_len=16, keep=8)
    assert [w.tolist() for w in inputs] == [out[:, a:n].tolist() for a, n in windows]

    inputs.clear()
    assert torch.equal(generate_ids(model, prompt(prompt_len), 30, greedy=True), out)
    # incremental: one prefill of the window when it (re)starts, then one token per forward
    starts = [a for a, _ in windows]
    fed = [(a, n) if i == 0 or a != starts[i - 1] else (n - 1, n) for i, (a, n) in enumerate(windows)]
    assert [w.tolist() for w in inputs] == [out[:, a:n].tolist() for a, n in fed]
    # prompt 4: prefill, slides at n=17, 26; prompt 30: cropped to 8 tokens, slides at n=39, 48, 57
    assert sum(n - a > 1 for a, n in fed) == (3 if prompt_len == 4 else 4)


@pytest.mark.parametrize("prompt_len, keep", [(5, None), (40, 1), (20, 16)])
def test_sliding_matches_the_reference_and_positions_stay_below_max_len(prompt_len: int, keep: int | None) -> None:
    model = make_model(max_len=16)
    seen = []
    embed_forward = model.embed.forward

    def spy(idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        seen.append(start_pos + idx.shape[1])
        return embed_forward(idx, start_pos)

    model.embed.forward = spy
    idx = prompt(prompt_len)
    out = generate_ids(model, idx, 40, seed=3, keep=keep)
    assert out.shape == (1, prompt_len + 40) and torch.equal(out[:, :prompt_len], idx)
    assert torch.equal(out, generate_ids(model, idx, 40, seed=3, keep=keep, incremental=False))
    assert max(seen) == 16


# ---------------------------------------------------------------------------------------------- sampling
def test_seeds_reproduce_and_differ() -> None:
    model = make_model()
    idx = prompt(4)
    a = generate_ids(model, idx, 25, seed=7, temperature=1.5)
    assert torch.equal(a, generate_ids(model, idx, 25, seed=7, temperature=1.5))
    assert not torch.equal(a, generate_ids(model, idx, 25, seed=8, temperature=1.5))


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    model = make_model()
    idx = prompt(4)
    greedy = generate_ids(model, idx, 20, greedy=True)
    assert torch.equal(generate_ids(model, idx, 20, top_k=1, seed=0), greedy)
    assert torch.equal(generate_ids(model, idx, 20, top_p=1e-6, seed=0), greedy)


def test_top_k_and_top_p_restrict_the_draw() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    p = torch.softmax(logits[0], dim=0)
    top2 = float(p[:2].sum())  # top_p just below the mass of two tokens keeps exactly two
    assert set(sample_next(logits, top_p=top2 - 1e-4, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, generator=g).tolist()) == set(range(6))
    assert set(sample_next(logits, temperature=0.05, generator=g).tolist()) == {0}  # cold: the argmax
    assert set(sample_next(logits, temperature=100.0, generator=g).tolist()) == set(range(6))
    assert set(sample_next(logits, temperature=0.0, generator=g).tolist()) == {0}  # temperature 0 is greedy
    ties = torch.zeros(2000, 6)
    assert set(sample_next(ties, top_k=2, generator=g).tolist()) == {0, 1}  # exactly k tokens, lower ids first


def test_stop_ids_end_generation_and_pad_finished_rows() -> None:
    model = make_model()
    free = generate_ids(model, prompt(4), 30, seed=5)
    stop = int(free[0, 10])
    out = generate_ids(model, prompt(4), 30, seed=5, stop_ids=[stop])
    first = (free[0, 4:] == stop).nonzero()[0, 0].item() + 4
    assert torch.equal(out[0], free[0, : first + 1])
    rows = generate_ids(model, prompt(4, batch=3), 30, seed=5, stop_ids=[stop])
    for row in rows:
        hits = (row[4:] == stop).nonzero()
        if len(hits):
            assert (row[4 + hits[0, 0] :] == stop).all()


def test_on_token_streams_and_can_stop() -> None:
    model = make_model()
    got = []
    out = generate_ids(model, prompt(4), 20, greedy=True, on_token=lambda t: got.append(t) or len(got) == 5)
    assert out.shape[1] == 9 and got == out[0, 4:].tolist()


def test_the_output_grows_as_tokens_come_instead_of_being_reserved(monkeypatch) -> None:
    """A huge max_new_tokens reserves nothing up front (1e12 tokens would be 8 TB), and a long run grows the buffer
    past its first size keeping every token: the returned ids are the prompt plus what on_token saw."""
    import spikedecoder.generate as generate_module

    model = make_model(max_len=16)
    got: list[int] = []
    out = generate_ids(model, prompt(4), 10**12, seed=1, on_token=lambda t: got.append(t) or len(got) == 3)
    assert out.shape == (1, 7) and out[0, 4:].tolist() == got
    monkeypatch.setattr(generate_module, "FIRST_CAPACITY", 5)  # 4 + 5 columns, grown to 18, 36, then 44
    got.clear()
    out = generate_ids(model, prompt(4, batch=2), 40, seed=1)
    assert out.shape == (2, 44) and torch.equal(out[:, :4], prompt(4, batch=2))
    streamed = generate_ids(model, prompt(4), 40, seed=1, on_token=lambda t: got.append(t) and False)
    assert streamed[0, 4:].tolist() == got and len(got) == 40
    monkeypatch.undo()
    assert torch.equal(generate_ids(model, prompt(4), 40, seed=1), streamed)  # the same tokens as one buffer


def test_mode_is_restored_and_rate_coding_reproduces_without_touching_global_rng() -> None:
    model = make_model(token_code="binary", position_code="binary", combine="concat", encoding="rate")
    model.train()
    state = torch.get_rng_state()
    a = generate_ids(model, prompt(4), 20, seed=2)
    assert torch.equal(a, generate_ids(model, prompt(4), 20, seed=2))
    assert model.training and torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------- text
def test_generate_text_streams_and_stops_before_the_stop_string() -> None:
    model = make_model()
    tok = TOKENIZER
    pieces = []
    free = generate_text(model, tok, "ab", 40, seed=4, stream=pieces.append)
    assert "".join(pieces) == free and len(free) == 40 and len(pieces) > 20  # streamed piece by piece
    stop = free[15:17]
    pieces.clear()
    text = generate_text(model, tok, "ab", 40, seed=4, stop=[stop, "never"], stream=pieces.append)
    assert text == free[: free.index(stop)] and "".join(pieces) == text
    assert generate_text(model, tok, "ab", 40, seed=4, incremental=False) == free


def test_detokenizer_holds_back_split_utf8_and_decodes_words_in_context() -> None:
    class Bytes:
        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    text = "héllo ☃ wörld"
    detok = _Detokenizer(Bytes(), list(b"> "))
    pieces = [detok.push(b) for b in text.encode()]
    assert "".join(pieces) + detok.flush() == text and not any("\ufffd" in p for p in pieces)

    class Words:
        words = ["to", "be", "or", "not"]

        def decode(self, ids: list[int]) -> str:
            return " ".join(self.words[i] for i in ids)

    detok = _Detokenizer(Words(), [0])
    assert [detok.push(i) for i in (1, 2, 3)] == [" be", " or", " not"]


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=2.5), "top_k must be an integer >= 1"),
        (dict(seed="1"), "seed must be an integer"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(keep=0), "keep=0"),
        (dict(keep=129), "keep=129"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(idx=prompt(3, batch=2), on_token=print), "batch of one prompt"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(idx=torch.tensor([[1, V]])), f"prompt token id {V} is outside the model's vocabulary"),
        (dict(idx=torch.tensor([1, 2])), "idx[None]"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    model = make_model()
    args = dict(idx=prompt(3), max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        generate_ids(model, args.pop("idx"), args.pop("max_new_tokens"), **args)
    assert message in str(err.value)


def test_temperature_zero_is_greedy_and_zero_tokens_returns_prompt() -> None:
    model = make_model()
    idx = prompt(3)
    greedy = generate_ids(model, idx, 5, greedy=True)
    assert torch.equal(generate_ids(model, idx, 5, temperature=0.0), greedy)
    assert torch.equal(model.generate(idx, 5, temperature=0), greedy)
    assert torch.equal(generate_ids(model, idx, 0), idx)


def test_text_errors() -> None:
    model, tok = make_model(), TOKENIZER
    with pytest.raises(ValueError, match="empty prompt.*newline"):
        generate_text(model, tok, "", 5)
    with pytest.raises(ValueError, match="unknown character.*'A', 'B'"):
        generate_text(model, tok, "ABA", 5)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate_text(model, tok, "ab", 5, stop=[""])
    with pytest.raises(TypeError, match="integer token ids"):
        generate_ids(model, torch.tensor([[0.5]]), 5)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_generate_streams_the_cached_text_and_reports_bad_prompts(tmp_path, monkeypatch, capsys) -> None:
    model = make_model()
    save_checkpoint(tmp_path, model, TOKENIZER, {})
    expected = generate_text(model, TOKENIZER, "ab", 30, seed=1, temperature=0.8, top_k=5)

    class Stdout:
        def __init__(self) -> None:
            self.events: list[str] = []

        def write(self, text: str) -> None:
            self.events.append(text)

        def flush(self) -> None:
            self.events.append("<flush>")

    args = ["generate", str(tmp_path), "--prompt", "ab", "--tokens", "30", "--seed", "1", "--temperature", "0.8"]
    for extra in ([], ["--no-cache"]):
        out = Stdout()
        monkeypatch.setattr(sys, "stdout", out)
        assert cli.main(args + ["--top-k", "5"] + extra) == 0
        assert "".join(e for e in out.events if e != "<flush>") == "ab" + expected + "\n"
        assert out.events.count("<flush>") >= 20  # each piece is flushed as soon as it is produced
    monkeypatch.undo()
    assert cli.main(["generate", str(tmp_path), "--prompt", "abZ"]) == 2
    assert "unknown character" in capsys.readouterr().err
