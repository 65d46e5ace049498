"""The playground in headless Chromium (Debian's package, driven by Playwright): a prompt streams in
as coloured tokens and the acceptance figure updates. Saves test-artifacts/playground.png."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.support import free_port, launch_up

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def site(tiny_dirs):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt-get)")
    http_port = free_port()
    models = os.environ.get("SPLITSPEC_MODEL_DIR")  # the real pair makes a readable screenshot
    target, draft = (Path(models) / "tinystories-260k", Path(models) / "tinystories-xs") if models else \
        (tiny_dirs["target"], tiny_dirs["draft_noisy"])
    process, _ = launch_up("--target", str(target), "--draft", str(draft), "--http-port", str(http_port),
                           "--threads", "1")
    yield f"http://127.0.0.1:{http_port}"
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except Exception:  # noqa: BLE001
        os.killpg(process.pid, signal.SIGKILL)


def test_playground_streams_coloured_tokens(site):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(site)
            page.fill("#prompt", "Once upon a time, there was a little")
            page.fill("#temperature", "0")
            page.fill("#k", "4")
            page.fill("#max-tokens", "60")
            page.click("#generate")
            expect(page.locator("#count")).to_have_text("60", timeout=30_000)
            expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
            tokens = page.locator("#output .tok")
            assert tokens.count() == 60
            classes = set(tokens.evaluate_all("nodes => nodes.map(n => n.className)"))
            assert classes <= {"tok accepted", "tok recovered", "tok bonus", "tok target"}
            assert "tok target" in classes  # the first token comes from the target's prefill
            assert classes & {"tok accepted", "tok bonus"}, "no speculative token was shown"
            acceptance = page.locator("#acceptance").inner_text()
            assert acceptance.endswith("%") and 0 < float(acceptance.rstrip("%")) <= 100
            colour = tokens.first.evaluate("n => getComputedStyle(n).backgroundColor")
            assert colour not in ("rgba(0, 0, 0, 0)", "transparent")
            assert page.locator("#status").inner_text() == ""
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        finally:
            browser.close()
