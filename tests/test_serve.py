"""`spikedecoder serve`'s API in process (Starlette's TestClient) on tiny untrained models: one event per token with
its text, the energy of the step that produced it and its spikes; 400s with one-line messages before any stream, 403
for other hosts and sites, 429 beyond the stream cap, streams taking turns; and the server process stopping at one
Ctrl-C."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("httpx")  # the TestClient's transport
from starlette.testclient import TestClient  # noqa: E402

import spikedecoder.serve as serve  # noqa: E402
from spikedecoder.config import SpikeDecoderConfig  # noqa: E402
from spikedecoder.data import CharTokenizer  # noqa: E402
from spikedecoder.energy import PRESETS, count_ops  # noqa: E402
from spikedecoder.events import record_spikes  # noqa: E402
from spikedecoder.generate import generate_text  # noqa: E402
from spikedecoder.model import SpikeDecoder  # noqa: E402
from spikedecoder.neurons import LIF  # noqa: E402

TEXT = "the keeper lit the lamp and the ships came home slowly one by one\n"
MAX_LEN = 16


def tiny(preset: str, seed: int) -> SpikeDecoder:
    torch.manual_seed(seed)
    cfg = SpikeDecoderConfig.from_preset(
        preset, vocab_size=len(set(TEXT)), max_len=MAX_LEN, n_layer=1, n_head=2, n_embd=32, timesteps=2
    )
    return SpikeDecoder(cfg).eval()


URL = "http://127.0.0.1:8000"  # the address the app below believes it is bound to


@pytest.fixture(scope="module")
def engine() -> serve.Engine:
    engine = serve.Engine(tiny("spikedecoder", 0), CharTokenizer.from_text(TEXT), tiny("ann", 1))
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def client(engine: serve.Engine) -> TestClient:
    return TestClient(serve.create_app(engine, "127.0.0.1", 8000), base_url=URL)


def unpack(event: dict, layers: list[dict]) -> dict[str, torch.Tensor]:
    """The event's spikes as the page reads them: {layer: (steps, neurons) bool}."""
    raw = torch.tensor(list(base64.b64decode(event["spikes"])), dtype=torch.uint8)
    bits = ((raw[:, None] >> torch.arange(8)) & 1).reshape(-1).bool()
    out, offset = {}, 0
    for layer in layers:
        n = layer["steps"] * layer["neurons"]
        out[layer["name"]] = bits[offset : offset + n].reshape(layer["steps"], layer["neurons"])
        offset += n
    assert bits[offset:].sum() == 0 and len(bits) - offset < 8  # only the last byte's padding is left
    return out


def events(client: TestClient, **params) -> list[dict]:
    r = client.get("/api/generate", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), "one `data:` line per event"
    return [json.loads(b[len("data: ") :]) for b in blocks]


def priced(model: SpikeDecoder, idx: torch.Tensor, cache) -> float:
    ops = count_ops(model, idx, cache=cache)
    prices = PRESETS["fp32"].prices()
    return sum(n * prices[kind] for kinds in ops.counts.values() for kind, n in kinds.items() if kind in prices)


def test_one_event_per_token_with_text_energy_and_spikes(client: TestClient, engine: serve.Engine) -> None:
    prompt = "the lamp"
    r = client.get("/api/generate", params=dict(prompt=prompt, tokens=20, seed=0, temperature=0.9, top_k=10))
    got = events(client, prompt=prompt, tokens=20, seed=0, temperature=0.9, top_k=10)
    assert [e["index"] for e in got] == list(range(20))
    # the same sampling as `spikedecoder generate` with that seed
    expected = generate_text(engine.model, engine.tokenizer, prompt, 20, seed=0, temperature=0.9, top_k=10)
    assert "".join(e["text"] for e in got) == expected
    layers = client.get("/api/info").json()["layers"]
    lifs = [n for n, m in engine.model.named_modules() if isinstance(m, LIF)]
    assert [layer["name"] for layer in layers] == lifs and all(layer["steps"] == 2 for layer in layers)
    # the spikes of the last token of each step: the dense model's, replayed on the same tokens
    ids = engine.tokenizer.encode(prompt) + [e["token"] for e in got]
    for e, n in zip(got, range(len(prompt), len(ids)), strict=False):
        assert e["pj"] > 0 and e["ann_pj"] > 0
        if n > MAX_LEN:
            break  # past the first slide the window restarts
        _, dense = record_spikes(engine.model, torch.tensor([ids[:n]]))
        shown = unpack(e, layers)
        assert all(torch.equal(shown[name], dense[name][:, 0, -1]) for name in lifs)
    assert max(len(block) for block in r.text.split("\n\n")) < 2048  # every event well under 2 KiB
    # the window: the prompt's prefill, then one token per step, and a refill of max_len // 2 tokens each time the
    # context would pass max_len
    fed, start = [], 0
    for n in range(len(prompt), len(prompt) + 20):
        if n - start > MAX_LEN:
            start = n - MAX_LEN // 2
            fed.append(MAX_LEN // 2)
        else:
            fed.append(n - start if n == len(prompt) else 1)
    assert [e["fed"] for e in got] == fed and [e["ann_fed"] for e in got] == fed
    assert got[-1]["total_pj"] == pytest.approx(sum(e["pj"] for e in got), abs=0.1)
    saving = 100 * (1 - got[-1]["total_pj"] / got[-1]["total_ann_pj"])
    assert got[-1]["saving_percent"] == pytest.approx(saving, abs=1e-3)  # figures rounded to 3 decimals


def test_each_tokens_energy_matches_an_independent_count_of_its_step(client: TestClient, engine: serve.Engine) -> None:
    """Replay the tokens through each model's own cache, counting every forward with count_ops as it runs."""
    prompt = "one by"
    got = events(client, prompt=prompt, tokens=6, seed=3)
    ids = engine.tokenizer.encode(prompt) + [e["token"] for e in got]
    for model, key in ((engine.model, "pj"), (engine.baseline, "ann_pj")):
        model = copy.deepcopy(model).eval()
        model.fold_norms()  # measured as deployed, like the energy report
        cache = model.new_cache()
        steps = [priced(model, torch.tensor([ids[: len(prompt)]]), cache)]
        steps += [priced(model, torch.tensor([[t]]), cache) for t in ids[len(prompt) : -1]]
        assert [e[key] for e in got] == pytest.approx(steps, rel=1e-9, abs=1e-3), key  # pJ to 3 decimals
    assert got[1]["pj"] < got[0]["pj"]  # a cached step costs less than the prompt's prefill


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"prompt": "", "tokens": 5}, "empty prompt"),
        ({"prompt": "the ZOO~", "tokens": 5}, "3 character(s) the model never saw in training: 'Z', 'O', '~'"),
        ({"prompt": "the", "tokens": 5000}, "tokens=5000: ask for 1 to 1000 tokens"),
        ({"prompt": "the", "tokens": 0}, "tokens=0"),
        ({"prompt": "the", "tokens": "ten"}, "tokens='ten' is not an integer"),
        ({"prompt": "the", "temperature": "hot"}, "temperature='hot' is not a number"),
        ({"prompt": "the", "temperature": "-1"}, "temperature must be a finite number >= 0"),
        ({"prompt": "the", "top_p": "1.5"}, "top_p must be in (0, 1]"),
        ({"prompt": "the", "top_k": "0"}, "top_k must be an integer >= 1"),
        ({"prompt": "the", "seed": "1.5"}, "seed='1.5' is not an integer"),
        ({"prompt": "the", "seed": str(2**70)}, "seed must be an integer from -2**63 to 2**64 - 1"),
        ({"prompt": "the", "seed": str(-(2**63) - 1)}, "seed must be an integer from -2**63 to 2**64 - 1"),
        ({"prompt": "the", "temperature": "1e-45"}, "temperature 1e-45 is too small"),
        ({"prompt": "the", "temperature": "nan"}, "temperature='nan' is not a finite number"),
        ({"prompt": "the", "top_p": "inf"}, "top_p='inf' is not a finite number"),
        ({"prompt": "the", "top_k": "1e3"}, "top_k='1e3' is not an integer"),
        ({"prompt": "the", "tokens": "5", "colour": "red"}, "unknown parameter(s) colour; the parameters are prompt"),
    ],
)
def test_bad_requests_get_400_with_one_line(client: TestClient, params: dict, needle: str) -> None:
    r = client.get("/api/generate", params=params)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert needle in message and "\n" not in message


def test_a_prompt_that_is_not_utf8_gets_400(client: TestClient) -> None:
    r = client.get("/api/generate?prompt=the%FF&tokens=3")
    assert r.status_code == 400 and "never saw in training: '\ufffd'" in r.json()["error"]


def test_cli_generate_refuses_a_seed_out_of_range_in_one_line(tmp_path, capsys) -> None:
    from spikedecoder.cli import main

    assert main(["generate", str(tmp_path / "no-run"), "--seed", str(2**70)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"error: --seed {2**70}: ") and "2**64 - 1" in err


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"host": "localhost:8000"}, 200),
        ({"origin": URL}, 200),
        ({"host": "evil.example"}, 403),
        ({"host": "evil.example:8000"}, 403),  # a name rebound to 127.0.0.1
        ({"host": "127.0.0.1:9999"}, 403),
        ({"origin": "https://evil.example"}, 403),
        ({"origin": "null"}, 403),
    ],
)
def test_other_hosts_and_sites_are_refused(client: TestClient, headers: dict, status: int) -> None:
    for path in ("/", "/api/info", "/static/app.js"):
        assert client.get(path, headers=headers).status_code == status, path
    r = client.get("/api/generate", params={"prompt": "the", "tokens": 1}, headers=headers)
    assert r.status_code == status and (status == 200 or "\n" not in r.json()["error"])


def test_streams_beyond_the_cap_get_429_and_slots_come_back(engine: serve.Engine, monkeypatch) -> None:
    capped = serve.Engine(engine.model, engine.tokenizer, max_streams=1)
    client = TestClient(serve.create_app(capped, "127.0.0.1", 8000), base_url=URL)
    running, release = threading.Event(), threading.Event()
    sample = serve.sample_next

    def hold(*args, **kwargs):  # the first stream waits at its first token until the second has been refused
        running.set()
        assert release.wait(60)
        return sample(*args, **kwargs)

    monkeypatch.setattr(serve, "sample_next", hold)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(r=client.get("/api/generate", params={"prompt": "the"})))
    thread.start()
    assert running.wait(60)
    r = client.get("/api/generate", params={"prompt": "the", "tokens": 3})
    assert r.status_code == 429 and "--max-streams" in r.json()["error"] and capped.streams == 1
    release.set()
    thread.join(60)
    assert first["r"].status_code == 200 and capped.streams == 0
    monkeypatch.setattr(serve, "sample_next", sample)
    assert len(events(client, prompt="the", tokens=3)) == 3  # the slot is free again


def test_streams_take_turns_in_arrival_order() -> None:
    lock, order = serve.TurnLock(), []
    lock.__enter__()  # held: the threads below queue up
    threads = []
    for i in range(5):
        threads.append(threading.Thread(target=lambda i=i: (lock.__enter__(), order.append(i), lock.__exit__())))
        threads[-1].start()
        time.sleep(0.05)  # each asks after the one before
    lock.__exit__()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_two_streams_at_once_are_each_what_they_would_be_alone(client: TestClient, monkeypatch) -> None:
    requests = {"a": {"prompt": "the keeper", "tokens": 12, "seed": 1}, "b": {"prompt": "home", "tokens": 12}}
    requests["b"].update(seed=2, temperature=0.5, top_p=0.9)
    alone = {k: events(client, **p) for k, p in requests.items()}
    both_started = threading.Barrier(2, timeout=60)
    sample = serve.sample_next
    started: set[int] = set()  # the streams (their sampling generators) that reached their first token

    def sample_when_both_run(*args, **kwargs):
        if id(kwargs["generator"]) not in started:  # each stream's first token waits for the other stream's
            started.add(id(kwargs["generator"]))
            both_started.wait()
        return sample(*args, **kwargs)

    monkeypatch.setattr(serve, "sample_next", sample_when_both_run)
    together: dict[str, list[dict]] = {}
    threads = [threading.Thread(target=lambda k=k: together.update({k: events(client, **requests[k])})) for k in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not both_started.broken
    for k in "ab":
        strip = [{key: v for key, v in e.items() if key != "ms"} for e in together[k]]
        assert strip == [{key: v for key, v in e.items() if key != "ms"} for e in alone[k]], k


def test_without_a_baseline_events_carry_the_spiking_model_only(engine: serve.Engine) -> None:
    alone = TestClient(serve.create_app(serve.Engine(engine.model, engine.tokenizer)), base_url=URL)
    got = events(alone, prompt="the", tokens=3, seed=0)
    assert len(got) == 3 and all("ann_pj" not in e and "saving_percent" not in e and e["pj"] > 0 for e in got)
    assert alone.get("/api/info").json()["baseline"] is None


def test_the_page_is_served_from_local_files_only(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    info = client.get("/api/info").json()
    assert info["model"] == "spikedecoder" and info["baseline"] == "ann" and info["timesteps"] == 2
    static = Path(serve.STATIC)
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name
        assert client.get(f"/static/{path.name}").status_code == 200


def test_serve_listens_on_loopback_only(capsys) -> None:
    from spikedecoder.cli import main

    assert main(["serve", "runs/none", "--host", "0.0.0.0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--host 0.0.0.0: serve listens on this machine only" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "runs/none", "--port", port]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"--port {port}: cannot listen on 127.0.0.1" in err and "choose another port" in err
    for flag in ("--max-streams", "--threads"):
        assert main(["serve", "runs/none", "--port", "0", flag, "0"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: {flag} 0: ") and err.count("\n") == 1
    serve.check_host("127.0.0.1")
    serve.check_host("::1")
    serve.check_host("localhost")


# ---------------------------------------------------------------------------------------------- the process
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from spikedecoder.rundir import save_checkpoint

    out = tmp_path_factory.mktemp("runs")
    save_checkpoint(out / "snn", tiny("spikedecoder", 0), CharTokenizer.from_text(TEXT), {})
    return out / "snn"


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_ends_open_streams_and_stops_within_2_s_without_a_traceback(runs: Path, presses: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "spikedecoder.cli", "serve", str(runs), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/api/generate?prompt=the&tokens=1000&seed=0"
        deadline = time.time() + 120
        while True:
            try:
                stream = urllib.request.urlopen(url, timeout=30)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "serve did not start"
                time.sleep(0.3)
        assert stream.readline().startswith(b"data: ")  # a 1,000-token stream is running
        stopped = time.time()
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=10)
        took = time.time() - stopped
        rest = stream.read()  # the stream ended (the server closed it) before its 1,000 tokens
        assert rest.count(b"data: ") < 999
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 2.0, f"{took:.1f} s to stop"
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert proc.returncode == 0 and out.rstrip().endswith("stopped")
