"""`ip2p app` in a real browser: the app runs in a subprocess on 127.0.0.1 with the demo model,
Playwright drives Debian's chromium. Upload an example, type an instruction, Generate, download
the result (it differs from the input and has the demo model's 64x64 size); a text file named
.png shows the app's error message, not a traceback.

Needs playwright (python) and /usr/bin/chromium (`apt-get install chromium`); skipped otherwise.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from train_helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "shapes_0.png")
CHROMIUM = os.environ.get("IP2P_JAX_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytest.importorskip("gradio", reason="the web UI needs the [app] extra (gradio)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install playwright)")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"the browser test needs chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ip2p_jax.cli", "app", "--steps", "2", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ip2p app exited with {proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ip2p app did not answer on {url}:\n{log.read_text()}")
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(accept_downloads=True)
        pg.set_default_timeout(20_000)
        pg.goto(server[0])
        yield pg
        browser.close()


def test_upload_generate_download(page, server, tmp_path):
    assert "using" in server[1].read_text() and "the demo model" in server[1].read_text()
    page.set_input_files("#source input[type=file]", EXAMPLE)
    page.wait_for_selector("#preview img")
    page.fill("#instruction textarea", "make the background blue")
    page.click("#generate")
    page.wait_for_selector("#result img")
    link = page.locator('#downloads a[download$=".png"]').first
    with page.expect_download() as dl:
        link.click()
    path = tmp_path / "result.png"
    dl.value.save_as(path)
    out = np.asarray(Image.open(path).convert("RGB"))
    src = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    assert out.shape == (64, 64, 3) == src.shape
    assert np.abs(out.astype(int) - src.astype(int)).mean() > 1.0     # an edit, not the input back
    names = [a.get_attribute("download") for a in page.locator("#downloads a").all()]
    assert any(n.endswith(".json") for n in names), names              # the settings sidecar comes along
    body = page.evaluate("src => fetch(src).then(r => r.arrayBuffer()).then(b => Array.from(new Uint8Array(b)))",
                         page.locator("#result img").get_attribute("src"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(bytes(body))).convert("RGB")), out)


def test_guidance_sweep(page, tmp_path):
    """After test_upload_generate_download (the example is still uploaded): a 2x1 sweep."""
    page.get_by_role("tab", name="Guidance sweep").click()
    page.fill("#text_scales textarea", "3, 9")
    page.fill("#image_scales textarea", "1.5")
    page.click("#sweep")
    page.wait_for_selector("#grid img")
    link = page.locator('#grid_downloads a[download$=".json"]').first
    with page.expect_download() as dl:
        link.click()
    dl.value.save_as(tmp_path / "grid.json")
    meta = json.loads((tmp_path / "grid.json").read_text())
    assert meta["grid"] == {"rows_image_scale": [1.5], "columns_text_scale": [3.0, 9.0]}
    assert meta["steps"] == 2 and meta["input"] == "shapes_0.png"
    width = page.locator("#grid img").evaluate("img => img.naturalWidth")
    assert width > 2 * 64


def test_bad_upload_shows_an_error_not_a_traceback(page, server, tmp_path):
    page.goto(server[0])   # a fresh page: an empty upload field
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    page.set_input_files("#source input[type=file]", str(fake))
    toast = page.locator(".toast-body").filter(has_text="not a readable image").first
    toast.wait_for()
    text = toast.inner_text()
    assert "Input image: notes.png: not a readable image" in text, text
    assert "Traceback" not in page.content()
    page.click("#generate")                # Generate with the bad file: the same message, no edit
    page.wait_for_function("() => document.body.innerText.split('not a readable image').length > 2")
    assert page.locator("#result img").count() == 0
