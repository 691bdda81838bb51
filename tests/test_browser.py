"""The served page end to end in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
`spikedecoder serve` in a subprocess, type a prompt, generate, watch tokens and the energy meter arrive.

Run with `make test-browser` (installs what it needs), which prints the page's speed: tokens per second as the page
counts them (from the click to the last token drawn) over a 300-token stream with the ANN baseline on. Skipped when
chromium, chromedriver or selenium is missing, unless SPIKEDECODER_REQUIRE_BROWSER=1 (as the make target sets), which
turns the skip into a failure.

Also a script: docs/serve.png, `python tests/test_browser.py RUN --baseline ANN_RUN --out docs/serve.png`,
and the page's speed on trained checkpoints, `python tests/test_browser.py RUN --baseline ANN_RUN --speed 300`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]


def browser_missing() -> str | None:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        return "chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install '.[browser]')"
    return None


@contextlib.contextmanager
def serving(run: Path, baseline: Path | None = None) -> Iterator[str]:
    """`spikedecoder serve` on a free localhost port in a subprocess; yields its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "spikedecoder.cli", "serve", str(run), "--port", str(port)]
    if baseline is not None:
        cmd += ["--baseline", str(baseline)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                urllib.request.urlopen(url + "api/info", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def chromium(width: int = 1500, height: int = 1150):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = 90.0, what: str = "the page") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def fill(driver, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny untrained spiking and ANN runs saved as `spikedecoder train` saves them."""
    import torch

    from spikedecoder.config import SpikeDecoderConfig
    from spikedecoder.data import CharTokenizer
    from spikedecoder.model import SpikeDecoder
    from spikedecoder.rundir import save_checkpoint

    tokenizer = CharTokenizer.from_text("the keeper lit the lamp and the ships came home\n")
    out = tmp_path_factory.mktemp("runs")
    for seed, preset in enumerate(("spikedecoder", "ann")):
        torch.manual_seed(seed)
        sizes = dict(vocab_size=tokenizer.vocab_size, max_len=16, n_layer=1, n_head=2, n_embd=32, timesteps=2)
        save_checkpoint(out / preset, SpikeDecoder(SpikeDecoderConfig.from_preset(preset, **sizes)), tokenizer, {})
    return out / "spikedecoder", out / "ann"


def page_speed(driver, tokens: int) -> float:
    """Generate `tokens` tokens from the page (prompt and settings as they are) and return its tokens/s."""
    from selenium.webdriver.common.by import By

    fill(driver, "tokens", str(tokens))
    driver.find_element(By.ID, "go").click()
    wait_for(lambda: text_of(driver, "status") == f"done: {tokens} tokens", timeout=300, what=f"{tokens} tokens")
    return float(text_of(driver, "speed").split()[0])


def test_page_generates_and_shows_energy(runs) -> None:
    missing = browser_missing()
    if missing:
        if os.environ.get("SPIKEDECODER_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium.webdriver.common.by import By

    with serving(*runs) as url, chromium() as driver:
        driver.get(url)
        wait_for(lambda: "baseline ann" in text_of(driver, "info"), what="the model info")
        fill(driver, "prompt", "the lamp")
        fill(driver, "tokens", "30")
        driver.find_element(By.ID, "go").click()
        wait_for(lambda: int(text_of(driver, "count")) >= 3, what="the first tokens")
        first = text_of(driver, "pj")
        assert first.endswith("J") and text_of(driver, "saving").endswith("%")
        wait_for(lambda: text_of(driver, "status") == "done: 30 tokens", what="the end of the stream")
        tokens = driver.find_elements(By.CSS_SELECTOR, "#text .tok")
        assert len(tokens) == 30 and text_of(driver, "text").startswith("the lamp")
        assert text_of(driver, "count") == "30" and text_of(driver, "ann_pj").endswith("J")
        assert "vs" in text_of(driver, "totals")
        raster_lit = driver.execute_script(
            "const c = document.getElementById('raster'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;"
        )
        assert raster_lit > 1000  # the spike raster and heat map were drawn
        # the page keeps up: tokens per second with the energy of both models and the raster, printed
        fill(driver, "prompt", "the lamp")
        speed = page_speed(driver, 300)
        print(f"\nthe page in headless Chromium: {speed:.1f} tokens/s (300 tokens, spiking model and ANN baseline)")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#text .tok")) == 300
        # a bad request: the page shows the server's one-line message
        fill(driver, "prompt", "the ZOO")
        driver.find_element(By.ID, "go").click()
        wait_for(lambda: "never saw in training" in text_of(driver, "error"), what="the error message")
        assert driver.find_elements(By.CSS_SELECTOR, "#text .tok") == []


def screenshot(run: str, baseline: str | None, out: str, tokens: int = 80) -> None:
    """The page mid-generation (prompt ROMEO:, seed 0) into `out`."""
    from selenium.webdriver.common.by import By

    with serving(Path(run), Path(baseline) if baseline else None) as url, chromium() as driver:
        driver.get(url)
        wait_for(lambda: text_of(driver, "info").startswith("model"))
        fill(driver, "tokens", "300")
        driver.find_element(By.ID, "go").click()
        wait_for(lambda: int(text_of(driver, "count")) >= tokens, what=f"{tokens} tokens")
        driver.save_screenshot(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Screenshot of `spikedecoder serve` mid-generation, or its speed.")
    parser.add_argument("run")
    parser.add_argument("--baseline")
    parser.add_argument("--out", default="docs/serve.png")
    parser.add_argument("--tokens", type=int, default=80, help="tokens generated when the shot is taken")
    parser.add_argument("--speed", type=int, metavar="TOKENS", help="print the page's tokens/s over TOKENS tokens")
    args = parser.parse_args()
    if args.speed:
        with serving(Path(args.run), Path(args.baseline) if args.baseline else None) as url, chromium() as driver:
            driver.get(url)
            wait_for(lambda: text_of(driver, "info").startswith("model"))
            page_speed(driver, 5)  # the first request with a prompt length measures that prefill's shape once
            print(f"{page_speed(driver, args.speed):.1f} tokens/s over {args.speed} tokens")
    else:
        screenshot(args.run, args.baseline, args.out, args.tokens)
        print(f"wrote {args.out}")
