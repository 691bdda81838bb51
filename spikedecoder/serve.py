"""`spikedecoder serve`: a local web page that generates text token by token and shows what each token costs.

Every new token comes from one incremental-decoding step (the cached forward generation runs; the first one is the
prompt's prefill, and a refill follows each slide of the window). The spiking model runs on the event-driven engine
where it has one (`to_events`, the same tokens), and each step is priced by the live meter (energy/live.py): the
counts its shape fixes, measured once, plus what depends on the step's own spikes, recorded as it runs: the energy
counter's figure for that step, at the speed of decoding. With a baseline (the ANN twin), the baseline runs its own
cached step on the same tokens and is priced the same way. The page (spikedecoder/static/, no external resources) and
scripts use `GET /api/generate`, which streams one Server-Sent Event per token: its text, the two energies and the
spikes of every LIF layer for that token, bit-packed (`/api/info` says how to unpack them).

Each request decodes with its own cache, window, sampling generator and (rate coding) random stream. Model steps
take turns under one lock granted in arrival order (`TurnLock`), so streams interleave step by step and each gets the
same share: one step already keeps the machine's cores busy, and the models, their meters' hooks and torch's global
settings (batch-invariant Linears, the RNG of rate coding) are shared, so steps in parallel would only contend. At
most `--max-streams` streams run at once (429 beyond); every parameter is checked before the stream starts (400).

Only this machine is served: the listening address is a loopback one, and a request whose Host header is not that
address (or localhost) with the bound port, or whose Origin is another site, gets 403: a web page elsewhere cannot
start generations in the user's browser, nor read them by rebinding a domain name to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn

from .data import UnknownCharacterError
from .energy import deployed
from .energy.live import StepMeter
from .generate import _check_sampling, _Detokenizer, _Window, sample_next
from .layers import batch_invariant

STATIC = Path(__file__).parent / "static"
MAX_TOKENS = 1000  # per request
MAX_PROMPT_CHARS = 10_000
MAX_STREAMS = 4  # streams generating at once (--max-streams)
PARAMETERS = ("prompt", "tokens", "temperature", "top_k", "top_p", "seed")


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400 and this one-line message."""


class TurnLock:
    """A lock granted in the order it was asked for: streams waiting for the models take turns, step by step."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


# ---------------------------------------------------------------------------------------------- the models
def _runner(model: nn.Module) -> nn.Module:
    """The event-driven copy where the model has spikes to exploit, else the model as deployed."""
    from .events import to_events

    try:
        return to_events(model)
    except ValueError:  # nothing for the event engine (the ANN)
        return deployed(model)


@dataclass
class Engine:
    """The loaded models (read-only after start), their meters, the lock their steps take, the open streams."""

    model: nn.Module
    tokenizer: Any
    baseline: nn.Module | None = None
    preset: str = "fp32"
    max_streams: int = MAX_STREAMS

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline.config.vocab_size != self.model.config.vocab_size:
            raise ValueError("the baseline has another vocabulary; serve models trained with the same tokenizer")
        self.lock = TurnLock()
        self.stopping = threading.Event()  # set on shutdown: every stream ends at its next token
        self.streams = 0
        self._count = threading.Lock()
        self.meter = StepMeter(_runner(self.model), deployed(self.model), self.preset)
        self.baseline_meter = None
        if self.baseline is not None:
            counted = deployed(self.baseline)
            self.baseline_meter = StepMeter(counted, counted, self.preset)
        self.layers: list[dict[str, Any]] = []

    def warm_up(self) -> None:
        """A few tokens before the first visitor: the first steps build kernels and count each step shape once."""
        first = next(iter(self.tokenizer.encode("\n") or [0]))
        for _ in token_events(self, Request(prompt="\n", tokens=3, seed=0), [first]):
            pass
        for meter in (self.meter, self.baseline_meter):
            if meter is not None and meter.fast:  # the refill after the window slides: its shape, measured now
                meter.calibrate(1, max(1, meter.config.max_len // 2), True)
        self.layers = [{"name": n, "steps": s.shape[0], "neurons": s.shape[1]} for n, s in self.meter.spikes.items()]

    def open_stream(self) -> bool:
        with self._count:
            if self.streams >= self.max_streams:
                return False
            self.streams += 1
            return True

    def close_stream(self) -> None:
        with self._count:
            self.streams -= 1

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "model": cfg.preset,
            "baseline": self.baseline.config.preset if self.baseline is not None else None,
            "energy_preset": self.preset,
            "timesteps": cfg.timesteps,
            "max_len": cfg.max_len,
            "max_tokens": MAX_TOKENS,
            "max_streams": self.max_streams,
            # each event's `spikes`: these layers' (steps x neurons) spikes of the token, one after the other, row
            # by row, 8 per byte (least significant bit first), base64
            "layers": self.layers,
            "energy": "per step from its spikes" if self.meter.fast else f"counted per step ({self.meter.why_slow})",
        }


# ---------------------------------------------------------------------------------------------- requests
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
    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}; the parameters are {', '.join(PARAMETERS)}")

    def number(key: str, kind: type, default: Any) -> Any:
        raw = query.get(key, "")
        if raw.strip() == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise BadRequest(f"{key}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise BadRequest(f"{key}={raw!r} is not a finite number")
        return value

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


# ---------------------------------------------------------------------------------------------- the stream
def pack_spikes(spikes: dict[str, torch.Tensor]) -> str:
    """Every layer's (steps, neurons) spikes, flattened one after the other, 8 per byte (LSB first), as base64."""
    if not spikes:
        return ""
    bits = torch.cat([s.reshape(-1) for s in spikes.values()]).numpy()
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode("ascii")


def token_events(
    engine: Engine, req: Request, ids: list[int], cancelled: threading.Event | None = None
) -> Iterator[dict[str, Any]]:
    """One event per generated token: its text, the energy of the step that produced it (and of the baseline's
    step on the same tokens), running totals and the spiking model's spikes for it. Same sampling as
    generate_ids. Ends early when `cancelled` or the engine's `stopping` is set."""
    cfg = engine.model.config
    snn, ann = engine.meter, engine.baseline_meter
    window = _Window(snn, max(1, cfg.max_len // 2), incremental=True)
    base_window = None if ann is None else _Window(ann, max(1, ann.config.max_len // 2), incremental=True)
    generator = None if req.seed is None else torch.Generator().manual_seed(req.seed)
    rng = None  # a rate-coded model's input spikes: a private stream seeded like generate_ids'
    if req.seed is not None and cfg.encoding == "rate":
        with torch.random.fork_rng(devices=[]):
            rng = torch.manual_seed(req.seed).get_state()
    detok = _Detokenizer(engine.tokenizer, ids)
    seq = list(ids)
    total = total_ann = 0.0
    for i in range(req.tokens):
        if engine.stopping.is_set() or (cancelled is not None and cancelled.is_set()):
            return
        context = torch.tensor([seq], dtype=torch.long)
        start = time.perf_counter()
        with engine.lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            if rng is not None:
                torch.set_rng_state(rng)
            with batch_invariant():  # the logits generate_ids would give, bit for bit
                logits = window.next_logits(context)
            if rng is not None:
                rng = torch.get_rng_state()
            step, spikes = snn.last, pack_spikes(snn.spikes)  # the meters are shared: read them under the lock
            if base_window is not None:  # only its energy is used: no need for batch-invariant Linears
                base_window.next_logits(context)
                base = ann.last
        token = int(sample_next(logits, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                generator=generator)[0])  # fmt: skip
        seq.append(token)
        total += step.pj
        event: dict[str, Any] = {"index": i, "token": token, "text": detok.push(token), "pj": round(step.pj, 3)}
        event.update(fed=step.tokens, total_pj=round(total, 3))
        if base_window is not None:
            total_ann += base.pj
            event.update(ann_pj=round(base.pj, 3), ann_fed=base.tokens, total_ann_pj=round(total_ann, 3))
            event["saving_percent"] = round(100 * (1 - total / total_ann), 3)
        event.update(spikes=spikes, ms=round(1000 * (time.perf_counter() - start), 2))
        if i == req.tokens - 1:
            event["text"] += detok.flush()
        yield event


# ---------------------------------------------------------------------------------------------- the web app
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host headers this server answers: its loopback address or localhost, with its port."""
    bound = f"[{host}]" if ":" in host else host
    names = {bound, *LOOPBACK_NAMES}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())  # a browser omits port 80


def create_app(engine: Engine, host: str = "127.0.0.1", port: int = 8000):
    """The Starlette app: the page, its static files, /api/info and the /api/generate event stream; requests from
    other hosts or sites are refused (403)."""
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool
    from starlette.requests import Request as HttpRequest
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    hosts = allowed_hosts(host, port)

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
        if not engine.open_stream():
            message = (f"{engine.max_streams} streams are generating, the most this server runs at once "
                       "(serve --max-streams); try again when one ends")  # fmt: skip
            return JSONResponse({"error": message}, status_code=429, headers={"Retry-After": "5"})
        cancelled = threading.Event()

        def lines() -> Iterator[str]:
            try:
                for event in token_events(engine, req, ids, cancelled):
                    yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
            finally:
                engine.close_stream()

        async def body():
            chunks = lines()
            try:
                async for chunk in iterate_in_threadpool(chunks):
                    yield chunk
            finally:  # the client went away, or the server stops: the stream ends at its next token
                cancelled.set()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/generate", generate),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)

    async def guard(scope, receive, send):
        """403 unless the Host is this server's loopback name and any Origin is this server."""
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            problem = None
            if headers.get("host", "").lower() not in hosts:
                problem = f"Host {headers.get('host', '(none)')!r} is not this server ({sorted(hosts)[0]})"
            elif "origin" in headers and urlsplit(headers["origin"]).netloc.lower() not in hosts:
                problem = f"requests from {headers['origin']!r} are not served: open the page from this server"
            if problem is not None:
                return await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
        await app(scope, receive, send)

    guard.engine = engine  # type: ignore[attr-defined]
    return guard


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
    if args.max_streams < 1:
        raise ValueError(f"--max-streams {args.max_streams}: allow at least 1 stream at once (default {MAX_STREAMS})")
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give at least 1 thread (default 1)")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: choose a port between 1 and 65535, e.g. 8000")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            msg = f"--port {args.port}: cannot listen on {args.host} ({exc.strerror}); choose another port"
            raise ValueError(msg) from None
    torch.set_num_threads(args.threads)  # a decoding step is too small to split: more threads only contend
    model, tokenizer, _ = load_checkpoint(args.checkpoint)
    baseline = load_checkpoint(args.baseline)[0] if args.baseline else None
    engine = Engine(model, tokenizer, baseline, args.preset, args.max_streams)
    engine.warm_up()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # Ctrl-C: open streams end at their next token
            engine.stopping.set()
            super().handle_exit(sig, frame)

    app = create_app(engine, args.host, args.port)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down
        pass
    print("stopped", flush=True)
    return 0
