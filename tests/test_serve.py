"""`spikedecoder serve`'s API in process (Starlette's TestClient) on tiny untrained models: one event per token with
its text and the energy of the step that produced it, 400s with one-line messages, independent concurrent streams."""

from __future__ import annotations

import copy
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("httpx")  # the TestClient's transport
from starlette.testclient import TestClient  # noqa: E402

import spikedecoder.serve as serve  # noqa: E402
from spikedecoder.config import SpikeDecoderConfig  # noqa: E402
from spikedecoder.data import CharTokenizer  # noqa: E402
from spikedecoder.energy import PRESETS, count_ops  # noqa: E402
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


@pytest.fixture(scope="module")
def engine() -> serve.Engine:
    return serve.Engine(tiny("spikedecoder", 0), CharTokenizer.from_text(TEXT), tiny("ann", 1))


@pytest.fixture(scope="module")
def client(engine: serve.Engine) -> TestClient:
    return TestClient(serve.create_app(engine))


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


def test_one_event_per_token_with_text_energy_and_firing(client: TestClient, engine: serve.Engine) -> None:
    prompt = "the lamp"
    got = events(client, prompt=prompt, tokens=20, seed=0, temperature=0.9, top_k=10)
    assert [e["index"] for e in got] == list(range(20))
    # the same sampling as `spikedecoder generate` with that seed
    expected = generate_text(engine.model, engine.tokenizer, prompt, 20, seed=0, temperature=0.9, top_k=10)
    assert "".join(e["text"] for e in got) == expected
    lifs = [n for n, m in engine.model.named_modules() if isinstance(m, LIF)]
    for e in got:
        assert e["pj"] > 0 and e["ann_pj"] > 0
        assert set(e["firing"]) == set(lifs) and all(0 <= r <= 1 for r in e["firing"].values())
        assert set(e["timestep_rates"]) == set(lifs) and all(len(r) == 2 for r in e["timestep_rates"].values())
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
    assert got[-1]["total_pj"] == pytest.approx(sum(e["pj"] for e in got))
    assert got[-1]["saving_percent"] == pytest.approx(100 * (1 - got[-1]["total_pj"] / got[-1]["total_ann_pj"]))


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
        assert [e[key] for e in got] == pytest.approx(steps, rel=1e-9), key
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
    ],
)
def test_bad_requests_get_400_with_one_line(client: TestClient, params: dict, needle: str) -> None:
    r = client.get("/api/generate", params=params)
    assert r.status_code == 400
    message = r.json()["error"]
    assert needle in message and "\n" not in message


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
    alone = TestClient(serve.create_app(serve.Engine(engine.model, engine.tokenizer)))
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
    serve.check_host("127.0.0.1")
    serve.check_host("::1")
    serve.check_host("localhost")
