"""Browser fixtures: Debian's chromium driven by Playwright, and a stand-in for another host."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests SKIPPED: {CHROMIUM} missing (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="browser tests SKIPPED: playwright not installed")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def other_host():
    """Another origin that answers anything and counts the requests it gets: a stand-in for a remote host
    (an image server, a phishing form's target, a ping receiver)."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()
            self.wfile.write(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def log_in(page, url: str, name: str, password: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.fill("input[type=text]", name)
    page.fill("input[type=password]", password)
    page.keyboard.press("Enter")


def shown_item(page, prompt_id: str = "ak-prompt", timeout: float = 30_000) -> str:
    """Wait until an item is rendered in the tab's prompt block; its comparison id ("" when none is left)."""
    page.wait_for_selector(f"#{prompt_id} [data-ak-render]", state="attached", timeout=timeout)
    return page.locator(f"#{prompt_id} [data-ak-render]").get_attribute("data-ak-item")


def next_item_rendered(page, before: str, prompt_id: str = "ak-prompt", timeout: float = 15_000) -> str:
    page.wait_for_function("([id, before]) => { const el = document.querySelector('#' + id + ' [data-ak-render]'); "
                           "return el && el.getAttribute('data-ak-item') !== before; }", arg=[prompt_id, before],
                           timeout=timeout)
    return shown_item(page, prompt_id)


def text_of(page, selector: str) -> str:
    """The text a block shows, exactly (textContent of its rendered text)."""
    return page.locator(f"{selector} .ak-text, {selector} .ak-md").first.text_content()


def focus_page(page) -> None:
    page.locator("body").click(position={"x": 5, "y": 5})  # outside any text box, so keys are shortcuts
