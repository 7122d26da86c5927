"""The web page at / driven end to end in headless Chromium (Playwright over Debian's `chromium`): generate with
live progress and preview, see the results in the gallery with their settings, cancel a running job.

Needs the `chromium` binary: the test installs it with apt-get when it runs as root on Debian (what .ci/run
does), and otherwise fails saying how to get it.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from playwright import sync_api as playwright  # pip install -e '.[test]' installs it

from test_server_support import running_server


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, check=True,
                       stdout=subprocess.DEVNULL)
        path = shutil.which("chromium")
    assert path, "headless Chromium is needed: apt-get install chromium (Debian) and re-run"
    return path


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("web")) as (url, app), playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.querySelector('#sampler').options.length > 0")
        yield page
        browser.close()


def test_generate_shows_progress_preview_and_gallery(page, tmp_path):
    for field, value in (("width", "64"), ("height", "64"), ("steps", "12"), ("cfg", "2"), ("seed", "5"),
                         ("batch", "2")):
        page.fill(f"#{field}", value)
    page.fill("#prompt", "a green triangle")
    page.select_option("#sampler", "dpmpp_2m")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('img.result').length == 2 && "
                           "[...document.querySelectorAll('img.result')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=60000)
    assert page.eval_on_selector("#preview", "e => e.src.startsWith('blob:')")  # a live preview arrived
    assert page.eval_on_selector("#progress", "e => e.value == e.max && e.max == 12")
    captions = page.eval_on_selector_all("figcaption", "es => es.map(e => e.textContent)")
    assert all("a green triangle" in c and "seed 5" in c and "dpmpp_2m" in c for c in captions)
    shot = Image.open(io.BytesIO(page.locator("img.result").first.screenshot())).convert("RGB")
    pixels = np.asarray(shot).astype(float)
    assert shot.width >= 150 and pixels.std() > 1  # an image is on screen, not an empty box
    page.screenshot(path=str(tmp_path / "page.png"))


def test_queue_view_cancels_a_running_job(page):
    page.fill("#steps", "10000")
    page.fill("#batch", "1")
    page.click("#generate")
    page.wait_for_selector("#queue button.cancel", timeout=30000)
    page.wait_for_function("document.querySelector('#queue').textContent.includes('running')")
    page.click("#queue button.cancel")
    page.wait_for_function("document.querySelector('#status').textContent == 'interrupted'", timeout=30000)
    page.wait_for_function("document.querySelector('#queue').textContent.includes('empty')", timeout=10000)


def test_bad_settings_show_the_reason(page):
    page.fill("#steps", "3")
    page.fill("#width", "4096")
    page.fill("#height", "4096")
    page.click("#generate")
    page.wait_for_selector("#message .error")
    assert "--max-pixels" in page.inner_text("#message")  # the server's reason, shown to the user
