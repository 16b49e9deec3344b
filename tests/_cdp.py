"""Headless Chromium driven over the DevTools protocol, with the standard library only.

``--remote-debugging-pipe`` makes Chromium read protocol commands from its fd 3 and write answers
and events to its fd 4, each message JSON ended by a NUL byte (what Puppeteer's ``pipe: true``
does): no port to pick, no websocket client to install, and the browser is ours alone.

>>> with Chromium() as browser:                                     # doctest: +SKIP
...     page = browser.new_page(1280, 1600)
...     page.goto("http://127.0.0.1:8000/ui")
...     page.errors()        # console errors, uncaught exceptions, CSP and network errors
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

WAIT = 60  # seconds any one wait may take (never reached when things work)


class CdpError(RuntimeError):
    """The browser answered a command with an error, or went away."""


class Chromium:
    """One headless Chromium process and its protocol pipe (a context manager)."""

    def __init__(self, executable: str | None = None):
        self.executable = executable or shutil.which("chromium") or shutil.which("chromium-browser")
        if self.executable is None:
            raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
        self._ids = itertools.count(1)
        self._messages: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._closed = False

    def __enter__(self) -> "Chromium":
        self._profile = tempfile.mkdtemp(prefix="persona-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        # bash puts the two pipe ends on fds 3 and 4 and execs the browser (a Python preexec_fn runs
        # before close_fds, which then closes them; dash takes only one-digit fds in a redirection).
        moves = f"3<&{to_browser_r} 4>&{from_browser_w}" + "".join(
            f" {fd}<&-" for fd in (to_browser_r, from_browser_w) if fd not in (3, 4))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "about:blank"]
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" {moves}', self.executable, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except CdpError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        os.close(self._to_browser)
        shutil.rmtree(self._profile, ignore_errors=True)

    # ------------------------------------------------------------------------- the protocol
    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\0")
            with self._changed:
                self._messages.extend(json.loads(m) for m in complete if m)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        os.close(self._from_browser)

    def _wait_for(self, match, timeout: float, start: int = 0) -> dict[str, Any]:
        """The first message from number ``start`` on that ``match`` accepts, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for message in self._messages[start:]:
                    if match(message):
                        return message
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "closed" if self._closed else f"no answer in {timeout} s"
                    raise CdpError(f"chromium {why}: {b''.join(self._stderr).decode(errors='replace')[-2000:]}")
                self._changed.wait(left)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout: float = WAIT) -> dict[str, Any]:
        """Run one command; its result (:class:`CdpError` if the browser refused it)."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except OSError as exc:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)  # its last words, from the stderr reader
            raise CdpError(f"chromium is gone ({exc}); it said: "
                           f"{b''.join(self._stderr).decode(errors='replace')[-2000:]}") from None
        answer = self._wait_for(lambda m: m.get("id") == ident, timeout)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def events(self, session: str, since: int = 0) -> list[dict[str, Any]]:
        """Events of one page, in order, from message number ``since``."""
        with self._changed:
            return [m for m in self._messages[since:] if "method" in m and m.get("sessionId") == session]

    def mark(self) -> int:
        """How many messages have come so far (where to start waiting for the next event)."""
        with self._changed:
            return len(self._messages)

    def wait_event(self, method: str, session: str, since: int, timeout: float = WAIT) -> dict[str, Any]:
        """The first ``method`` event of the page from message number ``since`` (:meth:`mark`) on."""
        return self._wait_for(lambda m: m.get("method") == method and m.get("sessionId") == session, timeout, since)

    def new_page(self, width: int = 1280, height: int = 1600) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        return page


class Page:
    """One tab: navigate, run script, read its console errors, screenshot."""

    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def goto(self, url: str) -> None:
        """Navigate and wait for the load event (redirects followed)."""
        since = self.browser.mark()
        self.browser.send("Page.navigate", {"url": url}, session=self.session)
        self.browser.wait_event("Page.loadEventFired", self.session, since)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (DevTools' own evaluation, not the page's scripts)."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                   session=self.session)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def submit(self, expression: str) -> None:
        """Run ``expression`` (which submits a form) and wait for the next page's load event."""
        since = self.browser.mark()
        self.evaluate(expression)
        self.browser.wait_event("Page.loadEventFired", self.session, since)

    def errors(self) -> list[str]:
        """Everything the page reported as an error: console.error, uncaught exceptions, and the
        browser's own log (a refused resource, a CSP violation, a failed or 4xx/5xx subresource)."""
        found = []
        for event in self.browser.events(self.session):
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = (str(a.get("value", a.get("description", ""))) for a in params["args"])
                found.append("console: " + " ".join(args))
            elif event["method"] == "Runtime.exceptionThrown":
                found.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        return found

    def requested(self) -> list[str]:
        """Every URL the page asked the network for (its document and every subresource)."""
        return [e["params"]["request"]["url"] for e in self.browser.events(self.session)
                if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path, *, full_page: bool = False) -> bytes:
        """A PNG of the viewport (or the whole page), written to ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.browser.send("Page.captureScreenshot", params, session=self.session)["data"])
        with open(path, "wb") as f:
            f.write(data)
        return data
