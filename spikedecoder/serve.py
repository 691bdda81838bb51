"""`spikedecoder serve`: a local web page that generates text token by token and shows what each token costs.

Every new token comes from one incremental-decoding step (the cached forward generation runs; the first one is the
prompt's prefill, and a refill follows each slide of the window). The same step is counted by the energy counter
(`energy.step_energy`) and priced; with a baseline (the ANN twin), the baseline runs its own cached step on the
same tokens and is priced the same way. The page (spikedecoder/static/, no external resources) and scripts use
`GET /api/generate`, which streams one Server-Sent Event per token.

Each request decodes with its own cache, window, sampling generator and (rate coding) random stream; model calls
take one lock, so several clients interleave step by step and each stream is what that request alone would give.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import UnknownCharacterError
from .energy import StepEnergy, deployed, step_energy
from .generate import _check_sampling, _Detokenizer, _Window, sample_next
from .layers import batch_invariant
from .neurons import LIF

STATIC = Path(__file__).parent / "static"
MAX_TOKENS = 1000  # per request
MAX_PROMPT_CHARS = 10_000


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400 and this one-line message."""


# ---------------------------------------------------------------------------------------------- metered decoding
class _Metered:
    """Stands in for a model inside generate's window: counts each forward it is asked to run (the step the window
    really runs), then runs it. With `record`, also keeps each LIF layer's spikes of the step's last token."""

    def __init__(self, model: nn.Module, counted: nn.Module, preset: str, record: bool = False):
        self.model, self.counted, self.preset, self.record = model, counted, preset, record
        self.config = model.config
        self.lifs = [(name, m) for name, m in model.named_modules() if isinstance(m, LIF)] if record else []
        self.step: StepEnergy | None = None
        self.spikes: dict[str, Tensor] = {}

    def new_cache(self):
        return self.model.new_cache()

    def __call__(self, idx: Tensor, cache) -> Tensor:
        self.step = step_energy(self.counted, idx, cache, self.preset)
        self.spikes = {}
        hooks = [m.register_forward_hook(self._keep(name)) for name, m in self.lifs]
        try:
            return self.model(idx, cache)
        finally:
            for h in hooks:
                h.remove()

    def _keep(self, name: str):
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            # (T, B, S, C): the last token's neurons per time step; other shapes (score maps): the whole step
            self.spikes[name] = out[:, 0, -1] if out.dim() == 4 else out.reshape(out.shape[0], -1)

        return hook


@dataclass
class Engine:
    """The loaded models (read-only after start) and the lock their calls take."""

    model: nn.Module
    tokenizer: Any
    baseline: nn.Module | None = None
    preset: str = "fp32"

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.counted = deployed(self.model)
        self.counted_baseline = deployed(self.baseline) if self.baseline is not None else None
        if self.baseline is not None and self.baseline.config.vocab_size != self.model.config.vocab_size:
            raise ValueError("the baseline has another vocabulary; serve models trained with the same tokenizer")

    def warm_up(self) -> None:
        """One token before the first visitor: the first model calls compile kernels (seconds)."""
        first = next(iter(self.tokenizer.encode("\n") or [0]))
        for _ in token_events(self, Request(prompt="\n", tokens=2, seed=0), [first]):
            pass

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "model": cfg.preset,
            "baseline": self.baseline.config.preset if self.baseline is not None else None,
            "energy_preset": self.preset,
            "timesteps": cfg.timesteps,
            "max_len": cfg.max_len,
            "max_tokens": MAX_TOKENS,
            "layers": [name for name, m in self.model.named_modules() if isinstance(m, LIF)],
        }


@dataclass
class Request:
    prompt: str
    tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


def parse_request(query: dict[str, str]) -> Request:
    """Query parameters -> Request; BadRequest naming the parameter and the accepted values."""

    def number(key: str, kind: type, default: Any) -> Any:
        raw = query.get(key, "")
        if raw.strip() == "":
            return default
        try:
            return kind(raw)
        except ValueError:
            raise BadRequest(f"{key}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None

    req = Request(
        prompt=query.get("prompt", ""),
        tokens=number("tokens", int, 100),
        temperature=number("temperature", float, 1.0),
        top_k=number("top_k", int, None),
        top_p=number("top_p", float, None),
        seed=number("seed", int, None),
    )
    if not req.prompt:
        raise BadRequest("empty prompt: give at least one character to continue, e.g. ROMEO:")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"the prompt has {len(req.prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if not 1 <= req.tokens <= MAX_TOKENS:
        raise BadRequest(f"tokens={req.tokens}: ask for 1 to {MAX_TOKENS} tokens")
    try:
        _check_sampling(req.tokens, req.temperature, req.top_k, req.top_p, req.seed)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return req


def encode_prompt(engine: Engine, prompt: str) -> list[int]:
    try:
        ids = list(engine.tokenizer.encode(prompt))
    except UnknownCharacterError as exc:
        shown = ", ".join(repr(c) for c in exc.chars[:20]) + (" ..." if len(exc.chars) > 20 else "")
        raise BadRequest(
            f"the prompt has {len(exc.chars)} character(s) the model never saw in training: {shown}; "
            "use only characters of its training text"
        ) from None
    if not ids:
        raise BadRequest(f"the tokenizer encodes the prompt {prompt!r} to no tokens; give a longer prompt")
    return ids


def _bits(spikes: Tensor) -> list[str]:
    return ["".join("1" if s else "0" for s in row.tolist()) for row in spikes.bool()]


def token_events(engine: Engine, req: Request, ids: list[int]) -> Iterator[dict[str, Any]]:
    """One event per generated token: its text, the energy of the step that produced it (and of the baseline's
    step on the same tokens), running totals and the spiking model's firing. Same sampling as generate_ids."""
    model, cfg = engine.model, engine.model.config
    snn = _Metered(model, engine.counted, engine.preset, record=True)
    window = _Window(snn, max(1, cfg.max_len // 2), incremental=True)
    ann = base_window = None
    if engine.baseline is not None:
        ann = _Metered(engine.baseline, engine.counted_baseline, engine.preset)
        base_window = _Window(ann, max(1, engine.baseline.config.max_len // 2), incremental=True)
    generator = None if req.seed is None else torch.Generator().manual_seed(req.seed)
    rng = None  # a rate-coded model's input spikes: a private stream seeded like generate_ids'
    if req.seed is not None and cfg.encoding == "rate":
        with torch.random.fork_rng(devices=[]):
            rng = torch.manual_seed(req.seed).get_state()
    detok = _Detokenizer(engine.tokenizer, ids)
    seq = list(ids)
    total = total_ann = 0.0
    for i in range(req.tokens):
        context = torch.tensor([seq], dtype=torch.long)
        start = time.perf_counter()
        with engine.lock, torch.no_grad(), batch_invariant(), torch.random.fork_rng(devices=[]):
            if rng is not None:
                torch.set_rng_state(rng)
            logits = window.next_logits(context)
            if rng is not None:
                rng = torch.get_rng_state()
            if base_window is not None:
                base_window.next_logits(context)
        token = int(sample_next(logits, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                generator=generator)[0])  # fmt: skip
        seq.append(token)
        step = snn.step
        total += step.pj
        event: dict[str, Any] = {"index": i, "token": token, "text": detok.push(token), "pj": step.pj}
        if ann is not None:
            total_ann += ann.step.pj
            event.update(ann_pj=ann.step.pj, saving_percent=100 * (1 - total / total_ann), ann_fed=ann.step.tokens)
            event["total_ann_pj"] = total_ann
        event.update(
            fed=step.tokens,
            total_pj=total,
            firing=step.firing,
            timestep_rates={n: s.float().mean(dim=1).tolist() for n, s in snn.spikes.items()},
            spikes={n: _bits(s) for n, s in snn.spikes.items() if s.dim() == 2 and s.shape[1] <= 4096},
            ms=1000 * (time.perf_counter() - start),
        )
        if i == req.tokens - 1:
            event["text"] += detok.flush()
        yield event


# ---------------------------------------------------------------------------------------------- the web app
def create_app(engine: Engine):
    """The Starlette app: the page, its static files, /api/info and the /api/generate event stream."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def page(_: HttpRequest) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def info(_: HttpRequest) -> JSONResponse:
        return JSONResponse(engine.info())

    async def generate(request: HttpRequest):
        try:
            req = parse_request(dict(request.query_params))
            ids = encode_prompt(engine, req.prompt)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

        def stream() -> Iterator[str]:
            for event in token_events(engine, req, ids):
                yield f"data: {json.dumps(event)}\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/generate", generate),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


# ---------------------------------------------------------------------------------------------- CLI
def check_host(host: str) -> None:
    """Only loopback addresses: the page runs models for whoever reaches it."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--host {host}: serve listens on this machine only; use 127.0.0.1, ::1 or localhost")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .rundir import load_checkpoint

    check_host(args.host)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: choose a port between 1 and 65535, e.g. 8000")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            msg = f"--port {args.port}: cannot listen on {args.host} ({exc.strerror}); choose another port"
            raise ValueError(msg) from None
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    model, tokenizer, _ = load_checkpoint(args.checkpoint)
    baseline = load_checkpoint(args.baseline)[0] if args.baseline else None
    engine = Engine(model, tokenizer, baseline, args.preset)
    engine.warm_up()
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0
