"""The dashboard and the report in a real browser (issue 14): headless Chromium loads ``/ui`` of a
real ``persona serve`` process and a report file, logs in through the login form, asks the chat,
and the pages report no console error (no script error, no resource refused by the
Content-Security-Policy, no failed request) and ask for nothing outside the server.

Chromium is driven over the DevTools protocol on a pipe (``tests/_cdp.py``, standard library
only). Where Debian's ``chromium`` is not installed the tests skip; ``make test`` installs it where
``apt-get`` is available.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from persona import LoraSettings, Store, UpdateConfig
from persona.store.tokens import TokenStore

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Chromium is not installed: the real-browser tests need Debian's `chromium` package "
           "(`apt-get install chromium`; `make test` installs it where apt-get is available)")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "interactions"
WAIT = 180  # seconds the server may take to start (never reached when things work)
PNG = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    """A store with an updated adapter (so the report has a timeline), served by ``persona serve``."""
    from persona.interactions import read_interactions
    from persona.training.trainer import Trainer

    root = tmp_path_factory.mktemp("ui-browser") / "adapters"
    store = Store.init(root, base=tiny_base)
    for ref, seed in (("user:alice", 1), ("user:bob", 2), ("domain:finance", 3)):
        store.create(ref, LoraSettings(init="random", seed=seed, rank=4))
    Trainer(store).update("user:alice", read_interactions(EXAMPLES / "alice.jsonl")[:16],
                          UpdateConfig(epochs=1, batch_size=8, holdout_fraction=0.25, force=True))
    admin, _ = TokenStore(store).create("admin")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "persona", "serve", "--store", str(root), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + WAIT
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "persona serve did not start"
        time.sleep(0.2)
    try:
        yield {"url": url, "admin": admin, "store": store, "root": root}
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()


@pytest.fixture
def browser():
    from _cdp import Chromium

    with Chromium() as chromium:
        yield chromium


def external(urls: list[str], allowed: str) -> list[str]:
    return [u for u in urls if not u.startswith((allowed, "data:"))]


def test_the_dashboard_in_chromium_logs_in_answers_and_reports_no_console_error(served, browser, tmp_path):
    page = browser.new_page(1280, 1600)
    page.goto(served["url"] + "/ui")
    assert page.evaluate("location.pathname") == "/ui/login"  # no session: the login page
    assert page.errors() == []
    token = served["admin"]
    page.submit(f"document.querySelector('input[name=token]').value = {token!r};"
                "document.querySelector('form[action=\"/ui/login\"]').submit()")
    assert page.evaluate("location.pathname") == "/ui", (page.evaluate("document.body.innerText"), page.errors())
    offered = page.evaluate("[...document.querySelectorAll('select[name=model] option')].map(o => o.value)")
    assert set(offered) == {"user:alice", "user:bob", "domain:finance"}
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script on the page can read the session
    page.submit("document.querySelector('select[name=model]').value = 'user:alice';"
                "document.querySelector('textarea[name=prompt]').value = 'Hello there';"
                "document.querySelector('input[name=max_tokens]').value = '6';"
                "document.querySelector('form[action=\"/ui/chat\"]').submit()")
    answers = page.evaluate("[...document.querySelectorAll('.ui-answer h3')].map(h => h.textContent)")
    assert len(answers) == 2 and answers[0].startswith("user:alice") and answers[1].startswith("the base")
    shot = page.screenshot(tmp_path / "ui.png")
    assert shot.startswith(PNG) and len(shot) > 10_000
    assert page.errors() == []
    assert external(page.requested(), served["url"]) == []
    page.submit("document.querySelector('form[action=\"/ui/logout\"]').submit()")
    assert page.evaluate("location.pathname") == "/ui/login"
    page.goto(served["url"] + "/ui")
    assert page.evaluate("location.pathname") == "/ui/login"  # logged out for good
    assert page.errors() == []


def test_a_script_injected_into_the_chat_never_runs(served, browser):
    """The prompt is escaped; and were it not, the page's CSP (no script-src) would refuse to run it."""
    page = browser.new_page(1000, 800)
    page.goto(served["url"] + "/ui/login")
    page.submit(f"document.querySelector('input[name=token]').value = {served['admin']!r};"
                "document.querySelector('form').submit()")
    hostile = "</textarea><script>document.title='owned'</script><img src=x onerror=\"document.title='owned'\">"
    page.submit("document.querySelector('textarea[name=prompt]').value = " + repr(hostile) + ";"
                "document.querySelector('input[name=max_tokens]').value = '2';"
                "document.querySelector('form[action=\"/ui/chat\"]').submit()")
    assert page.evaluate("document.title") == "persona dashboard"
    assert page.evaluate("document.querySelector('textarea[name=prompt]').value") == hostile
    assert page.evaluate("document.querySelectorAll('script, img').length") == 0
    assert page.errors() == []


def test_the_report_file_in_chromium_has_no_console_error_and_no_external_request(served, browser, tmp_path):
    out = tmp_path / "report.html"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "persona", "report", "--store", str(served["root"]), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    page = browser.new_page(1280, 1600)
    page.goto(out.as_uri())
    assert "user:alice" in page.evaluate("document.body.innerText")
    assert page.evaluate("document.querySelectorAll('svg').length") > 0  # the plots, inline
    shot = page.screenshot(tmp_path / "report.png")
    assert shot.startswith(PNG)
    assert page.errors() == []
    assert external(page.requested(), out.as_uri()) == []
