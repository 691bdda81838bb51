"""Text generation: greedy, temperature, top-k and top-p sampling with exact O(1)-per-token incremental decoding.

Spiking attention has no softmax, so each layer's causal attention is a running sum S = sum_j k_j^T v_j (SPEC
section 6): a new token costs the same whatever the context length. Decoding prefills the prompt once, then feeds one
token at a time through the model's cache. Under `batch_invariant()` every Linear computes a row with the same kernel
shape however many rows share the call, and spike counts are small integers (exact in float32), so the incremental
logits are bitwise equal to recomputing the window (`incremental=False`, the reference). Binary scores (residual=2:
a LIF on each q.k count) cannot be summed ahead, so that mode keeps K and V (exact still, but O(window) per token).
Softmax attention (the ANN) keeps a K/V cache and agrees to float rounding.

Sliding policy (context longer than max_len): the model sees a window seq[start:] of the tokens so far. Whenever
the window would exceed `max_len` tokens, it restarts from the last `keep` tokens (default max_len // 2), re-encoded
at positions 0.. by one prefill, and decoding goes on from there. A prompt longer than max_len is cropped by the same
rule. Both modes apply the rule to the same token history, so they see identical windows and positions at every step
and stay exactly equal; positions never exceed max_len. One prefill of `keep` tokens per max_len - keep + 1 new
tokens keeps the amortised cost O(1) per token (keep=max_len gives the classic last-max_len window, at a full
prefill per token).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .inputs import check_token_ids
from .layers import batch_invariant

FIRST_CAPACITY = 1024  # new tokens the output buffer holds at first; it doubles when full


# ---------------------------------------------------------------------------------------------- argument checks
MIN_TEMPERATURE = 1e-3  # below it, logits / temperature can overflow float32 (inf - inf: no distribution)
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # torch.Generator takes a 64-bit seed, signed or not


def _check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature {temperature!r} is too small to divide the logits by (they overflow): use 0 for "
            f"greedy decoding or at least {MIN_TEMPERATURE}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None to keep every token), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None to keep every token), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not MIN_SEED <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1 (or None for torch's global "
                         f"RNG), got {seed!r}")  # fmt: skip


def _check_keep(keep: int | None, max_len: int) -> int:
    if keep is None:
        return max(1, max_len // 2)
    if not isinstance(keep, int) or not 1 <= keep <= max_len:
        raise ValueError(
            f"keep={keep!r}: after a slide the window restarts from the last `keep` tokens, so it must be an "
            f"integer in [1, max_len={max_len}]"
        )
    return keep


# ---------------------------------------------------------------------------------------------- sampling
def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, V) logits -> (B,) token ids: the argmax (greedy, or temperature 0), else a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens (exactly k: ties go to the lower id)
    and then to the smallest set of most likely tokens whose probability reaches top_p (the most likely token
    always stays)."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # stable sort: among equal logits the lower id comes first, so exactly top_k tokens stay
        keep = logits.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
        logits = torch.full_like(logits, -math.inf).scatter(-1, keep, logits.gather(-1, keep))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        drop_sorted = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # the more likely tokens already reach top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    try:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    except RuntimeError as exc:  # NaN/inf probabilities: say where they come from, not torch's internals
        if bool(torch.isfinite(probs).all()):
            raise
        raise ValueError(
            f"the next-token probabilities are not finite (temperature={temperature:g}): a temperature that small "
            "overflows the scaled logits (use --greedy or a larger --temperature), or the model computes NaN/inf "
            "logits (a damaged checkpoint)"
        ) from exc


@contextlib.contextmanager
def _seeded_global_rng(seed: int | None, device: torch.device, enabled: bool) -> Iterator[None]:
    """Seed torch's global RNG (for draws inside the model) and restore the caller's state afterwards."""
    if not enabled:
        yield
        return
    accel = device.type != "cpu"
    devices = range(torch.get_device_module(device.type).device_count()) if accel else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accel else None):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- the window
class _Window:
    """The tokens the model conditions on, seq[start:], and (incremental) the cache holding seq[start:fed]."""

    def __init__(self, model: nn.Module, keep: int, incremental: bool):
        self.model = model
        self.max_len = model.config.max_len
        self.keep = keep
        self.incremental = incremental
        self.start = 0
        self.fed = 0
        self.cache = None

    def next_logits(self, seq: Tensor) -> Tensor:
        """(B, V) logits for the token after seq (B, n); seq only grows between calls."""
        n = seq.shape[1]
        if n - self.start > self.max_len:  # slide: restart from the last `keep` tokens at positions 0..
            self.start, self.cache = n - self.keep, None
        if not self.incremental:
            return self.model(seq[:, self.start :])[:, -1]
        if self.cache is None:
            self.cache, self.fed = self.model.new_cache(), self.start
        logits = self.model(seq[:, self.fed :], self.cache)[:, -1]  # a prefill, or the one newest token
        self.fed = n
        return logits


def generate_ids(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    incremental: bool = True,
    keep: int | None = None,
    stop_ids: Iterable[int] | None = None,
    on_token: Callable[[int], bool | None] | None = None,
) -> Tensor:
    """Continue token ids idx (B, S) by up to max_new_tokens; returns (B, S + generated), prompt included.

    Sampling: greedy=True (or temperature=0) takes the argmax; otherwise tokens are drawn with temperature / top_k
    / top_p from a torch.Generator seeded with `seed` (same seed, same tokens; None uses torch's global RNG).

    Decoding: by default (incremental=True) the window is prefilled once into model.new_cache() and each new token
    is one single-token forward: O(1) per token for spiking attention (running sums of k^T v), a growing K/V cache
    for softmax attention and for binary scores (residual=2, whose score LIF needs every key). incremental=False
    recomputes the window for every token: the reference, with the same windows and, for spiking attention,
    bitwise the same logits. `keep`: tokens kept when the window slides past max_len (module docstring).

    Stopping: generation ends early once every row has produced one of stop_ids (the stop id is kept; a row that
    stopped first is padded with its stop id), or when on_token (called with each new id, batch of one only)
    returns True.

    A rate-coded model draws its input spikes from the global RNG: with a seed, they come from a private stream
    seeded the same way, so the text still reproduces (incremental decoding keeps each token's first draw, while
    the reference redraws: the two modes then differ).
    """
    cfg = model.config
    check_token_ids(idx, cfg.vocab_size, "prompt")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    keep = _check_keep(keep, cfg.max_len)
    if on_token is not None and idx.shape[0] != 1:
        raise ValueError(
            f"on_token receives one token id per step, so it needs a batch of one prompt, got {idx.shape[0]}"
        )
    stops = torch.tensor(sorted({int(s) for s in stop_ids or ()}), dtype=torch.long, device=idx.device)

    b, s = idx.shape
    # the buffer grows by doubling as tokens come, so a huge max_new_tokens (stopped early, or streamed until
    # Ctrl-C) never reserves memory for tokens that are not generated
    out = torch.empty(b, s + min(max_new_tokens, FIRST_CAPACITY), dtype=torch.long, device=idx.device)
    out[:, :s] = idx
    n = s
    generator = None if seed is None else torch.Generator(device=idx.device).manual_seed(seed)
    stop_token = torch.full((b,), -1, dtype=torch.long, device=idx.device)  # -1 while a row is running
    private_rng = seed is not None and cfg.encoding == "rate"
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            batch_invariant(),
            _seeded_global_rng(seed, idx.device, enabled=private_rng),
        ):
            window = _Window(model, keep, incremental)
            for _ in range(max_new_tokens):
                logits = window.next_logits(out[:, :n])
                token = sample_next(
                    logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator
                )
                if stops.numel():
                    token = torch.where(stop_token >= 0, stop_token, token)
                    stop_token = torch.where((stop_token < 0) & torch.isin(token, stops), token, stop_token)
                if n == out.shape[1]:
                    grown = torch.empty(b, min(2 * n, s + max_new_tokens), dtype=torch.long, device=idx.device)
                    grown[:, :n] = out
                    out = grown
                out[:, n] = token
                n += 1
                if on_token is not None and on_token(int(token[0])):
                    break
                if stops.numel() and bool((stop_token >= 0).all()):
                    break
    finally:
        model.train(was_training)
    return out[:, :n]


# ---------------------------------------------------------------------------------------------- text
class _Detokenizer:
    """Token ids -> text pieces as they come, O(1) per token. A new id is decoded after a few ids before it and the
    piece is what it adds to their text, so tokenizers that join words with spaces or mark word starts come out
    right; a byte-level BPE character split over several tokens decodes to U+FFFD until its last byte arrives, so
    such a tail is held back (at most `max_pending` tokens)."""

    context = 4
    max_pending = 8

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self.decode = tokenizer.decode
        self.ids = list(prompt_ids[-self.context :])
        self.shown = len(self.ids)  # ids[:shown] are already text

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.decode(self.ids)
        if full.endswith("\ufffd") and len(self.ids) - self.shown < self.max_pending:
            return ""
        return self._take(full)

    def flush(self) -> str:
        return self._take(self.decode(self.ids)) if len(self.ids) > self.shown else ""

    def _take(self, full: str) -> str:
        before = self.decode(self.ids[: self.shown])
        piece = full[len(before) :] if full.startswith(before) else self.decode(self.ids[self.shown :])
        self.ids = self.ids[-self.context :]
        self.shown = len(self.ids)
        return piece


class _StopText:
    """Collects the generated text, ends it before the first stop string, and streams only text that can no longer
    turn out to be part of a stop string."""

    def __init__(self, stop: list[str], stream: Callable[[str], None] | None):
        self.stop = stop
        self.longest = max((len(s) for s in stop), default=0)
        self.stream = stream
        self.text = ""
        self.streamed = 0
        self.stopped = False

    def add(self, piece: str) -> bool:
        """Append a piece; True once a stop string has appeared (the text is then cut before it)."""
        searched_from = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            self._emit(len(self.text))
            return True
        self._emit(len(self.text) - self._held())
        return False

    def finish(self) -> str:
        self._emit(len(self.text))
        return self.text

    def _held(self) -> int:
        """Length of the longest tail of the text that begins a stop string."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> None:
        if upto > self.streamed:
            if self.stream is not None:
                self.stream(self.text[self.streamed : upto])
            self.streamed = upto


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    *,
    stop: list[str] | None = None,
    stream: Callable[[str], None] | None = None,
    **sampling: Any,
) -> str:
    """Continue `prompt` by up to max_new_tokens tokens and return the new text (without the prompt).

    Generation ends at max_new_tokens or at the first stop string in the new text; the returned (and streamed)
    text then ends just before the stop string, which is left out. `stream` receives the text piece by piece as
    tokens are produced. `sampling`: the keyword options of generate_ids (greedy, temperature, top_k, top_p, seed,
    incremental, keep). Characters the tokenizer does not know raise its own error.
    """
    if not prompt:
        raise ValueError(
            "empty prompt: the model needs at least one token to continue; start from a newline ('\\n') "
            "or a character name such as 'ROMEO:'"
        )
    if "on_token" in sampling:
        raise TypeError("generate_text streams through `stream`; on_token is generate_ids' hook")
    stops = list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise ValueError(f"the tokenizer encodes the prompt {prompt!r} to no tokens; give a longer prompt")
    device = next(model.parameters()).device
    detok = _Detokenizer(tokenizer, ids)
    text = _StopText(stops, stream)
    generate_ids(
        model,
        torch.tensor([ids], dtype=torch.long, device=device),
        max_new_tokens,
        on_token=lambda token: text.add(detok.push(token)),
        **sampling,
    )
    if not text.stopped:
        text.add(detok.flush())
    return text.finish()
