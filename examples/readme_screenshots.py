"""Make the README's pictures: ``docs/img/ui.png`` (the dashboard, ``/ui``) and ``docs/img/report.png``
(``persona report``'s file), from a demo store on the embedded base.

The store (a temp dir): alice updated twice from ``examples/interactions`` (the second update
revises where she works), bob and ``domain:finance`` created. ``persona serve`` serves it; headless
Chromium (driven over the DevTools protocol by ``tests/_cdp.py``) logs in with an admin token, asks
alice's adapter and the base the same question, and screenshots the page; then ``persona report``
writes the report of the same store, screenshotted too. Needs Debian's ``chromium``; takes a few
minutes on a CPU (two updates of SmolLM2-135M).

    python examples/readme_screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the DevTools client the browser tests use

from _cdp import Chromium  # noqa: E402

EX = ROOT / "examples" / "interactions"
QUESTION = "Where do I work now?"
MAX_BYTES = 300_000  # what a README picture may weigh


def persona(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "persona", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"persona {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def small_png(path: Path, data: bytes) -> None:
    """Write the PNG, quantized to 256 colours if it is over :data:`MAX_BYTES` (text and flat plots lose nothing)."""
    path.write_bytes(data)
    if len(data) > MAX_BYTES:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--base", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each update (the demo's 4)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persona-screens-") as tmp:
        store = Path(tmp) / "adapters"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PERSONA_HOME": str(store), "HF_HUB_OFFLINE": "1"}
        persona("init", *(["--base", args.base] if args.base else []), env=env)
        for ref in ("user:alice", "user:bob", "domain:finance"):
            persona("create", ref, env=env)
        for ref, data in (("user:alice", "alice.jsonl"), ("user:alice", "alice-2.jsonl")):
            persona("update", ref, "--data", str(EX / data), "--epochs", str(args.epochs), "--lr", "2e-3", env=env)
            print(f"updated {ref} from {data}", flush=True)
        token = json.loads(persona("token", "create", "--admin", "--json", env=env))["token"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "persona", "serve", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            with Chromium() as browser:
                page = browser.new_page(1280, 1600)
                page.goto(url + "/ui")
                page.submit(f"document.querySelector('input[name=token]').value = {token!r};"
                            "document.querySelector('form').submit()")
                page.submit("document.querySelector('select[name=model]').value = 'user:alice';"
                            f"document.querySelector('textarea[name=prompt]').value = {QUESTION!r};"
                            "document.querySelector('input[name=max_tokens]').value = '40';"
                            "document.querySelector('form[action=\"/ui/chat\"]').submit()")
                problems = page.errors()
                small_png(args.out / "ui.png", page.screenshot(Path(tmp) / "ui.png"))
                report = Path(tmp) / "report.html"
                persona("report", "--out", str(report), env=env)
                page = browser.new_page(1280, 1600)
                page.goto(report.as_uri())
                problems += page.errors()
                small_png(args.out / "report.png", page.screenshot(Path(tmp) / "report.png"))
        finally:
            server.kill()
            server.wait()
    if problems:
        sys.exit("the pages reported errors:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
