"""The dashboard's HTML: the login page and the dashboard (chat box, side-by-side answers, report).

Server-rendered, no script, no external resource: every style is inline in the page and every
form posts to the dashboard itself, which the pages' Content-Security-Policy (:data:`UI_HEADERS`,
sent by :class:`UiHeaders` on every ``/ui`` response, errors included) enforces in the browser.
Every value that comes from a caller or the store is escaped here (:func:`e`); the report's body
comes escaped from :mod:`persona.report`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Sequence

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
UI_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # not no-referrer: under it a browser sends "Origin: null" with the page's own form posts
    "referrer-policy": "same-origin",
    "cache-control": "no-store",  # pages carry the session's CSRF token and private answers
    "x-frame-options": "DENY",  # frame-ancestors for browsers that predate it
}
DEFAULT_PROMPT = "In one sentence: what do you know about me?"
DEFAULT_MAX_TOKENS = 64
MAX_CHAT_TOKENS = 512


def e(value: object) -> str:
    """``value`` as HTML text (quotes too, so it is safe in an attribute)."""
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class ChatForm:
    """What the chat box holds: the last question asked (or the one that failed, to fix and resend)."""

    model: str = ""
    prompt: str = DEFAULT_PROMPT
    max_tokens: str = str(DEFAULT_MAX_TOKENS)


@dataclass(frozen=True)
class ChatPair:
    """One prompt's answers: the adapter's and the base's, with what ran."""

    model: str
    prompt: str
    max_tokens: int
    adapter_text: str
    adapter_ran: str  # the pinned stack (``user:alice@v3``)
    base_name: str
    base_text: str


_STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2329;
  background: #f5f6f8; }
.ui-top { display: flex; align-items: center; gap: 1.2rem; padding: .7rem 1.5rem; background: #1d2a3a; color: #fff; }
.ui-top h1 { font-size: 1.15rem; margin: 0; font-weight: 650; letter-spacing: .02em; }
.ui-top .ui-meta { opacity: .85; font-size: .9rem; }
.ui-top form { margin-left: auto; }
.ui-main { max-width: 1180px; margin: 1.2rem auto; padding: 0 1.2rem; }
.ui-card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 1rem 1.2rem;
  margin-bottom: 1.2rem; }
.ui-card h2 { font-size: 1.05rem; margin: 0 0 .7rem; }
.ui-row { display: flex; gap: .8rem; flex-wrap: wrap; align-items: end; }
label { display: flex; flex-direction: column; gap: .25rem; font-size: .85rem; color: #4a5561; }
select, input, textarea { font: inherit; padding: .35rem .5rem; border: 1px solid #b9c1ca; border-radius: 5px;
  background: #fff; }
textarea { width: 100%; box-sizing: border-box; min-height: 4.2rem; resize: vertical; }
button { font: inherit; padding: .4rem .9rem; border-radius: 5px; border: 1px solid #2d5b8a; background: #2f6db0;
  color: #fff; cursor: pointer; }
button.ui-quiet { background: transparent; border-color: #8fa3b8; color: inherit; }
.ui-pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin-top: 1rem; }
.ui-answer { border: 1px solid #dde1e6; border-radius: 6px; padding: .6rem .8rem; background: #fafbfc; }
.ui-answer h3 { font-size: .9rem; margin: 0 0 .4rem; color: #2f6db0; }
.ui-answer.ui-base h3 { color: #6b7682; }
.ui-answer pre { white-space: pre-wrap; word-break: break-word; margin: 0;
  font: 14px/1.45 ui-monospace, Menlo, Consolas, monospace; }
.ui-note { color: #5c6670; font-size: .88rem; }
.ui-error { background: #fdecec; border: 1px solid #e3a3a3; color: #7a1f1f; border-radius: 6px; padding: .6rem .8rem;
  margin-bottom: 1rem; }
.ui-gap { margin-top: .6rem; }
.ui-login { max-width: 26rem; margin: 12vh auto; }
.ui-login input { width: 100%; box-sizing: border-box; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        # an empty icon: the browser asks for /favicon.ico otherwise
        f"<link rel=\"icon\" href=\"data:,\"><title>{e(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def login_page(message: str | None = None) -> str:
    """The login form: a token, posted to ``/ui/login`` (never put in a URL)."""
    error = f'<div class="ui-error">{e(message)}</div>' if message else ""
    return _page("persona: log in", f"""
<main class="ui-main ui-login"><div class="ui-card">
<h2>persona dashboard</h2>
{error}
<form method="post" action="/ui/login">
<label>API token <input type="password" name="token" autocomplete="current-password" required
  placeholder="psn_..."></label>
<p class="ui-note">A token from <code>persona token create --admin</code> sees every adapter;
one from <code>persona token create user:NAME</code> sees that user's adapters and the shared domains.</p>
<button type="submit">Log in</button>
</form></div></main>""")


def _hidden(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(csrf)}">' if csrf else ""


def _chat_form(csrf: str, adapters: Sequence[str], form: ChatForm) -> str:
    if not adapters:
        return '<p class="ui-note">No adapter to try yet: create one with <code>persona create</code>.</p>'
    chosen = form.model if form.model in adapters else adapters[0]
    options = "".join(f'<option value="{e(a)}"{" selected" if a == chosen else ""}>{e(a)}</option>' for a in adapters)
    prompt, max_tokens = form.prompt, form.max_tokens
    return f"""
<form method="post" action="/ui/chat">{_hidden(csrf)}
<div class="ui-row">
<label>Adapter <select name="model">{options}</select></label>
<label>Max new tokens
  <input type="number" name="max_tokens" min="1" max="{MAX_CHAT_TOKENS}" value="{e(max_tokens)}"></label>
</div>
<label class="ui-gap">Prompt <textarea name="prompt" required>{e(prompt)}</textarea></label>
<div class="ui-row ui-gap"><button type="submit">Ask the adapter and the base</button>
<span class="ui-note">Greedy decoding, so both answers are reproducible. Nothing asked here is logged for
training.</span></div>
</form>"""


def _answer(text: str) -> str:
    if text.strip():
        return f"<pre>{e(text)}</pre>"
    what = f"only whitespace ({len(text)} characters)" if text else "no text: the model ended its answer at once"
    return f'<pre>{e(text)}</pre><p class="ui-note">({what})</p>'


def _answers(chat: ChatPair) -> str:
    return f"""
<div class="ui-pair">
<div class="ui-answer"><h3>{e(chat.model)} <span class="ui-note">({e(chat.adapter_ran)})</span></h3>
{_answer(chat.adapter_text)}</div>
<div class="ui-answer ui-base"><h3>the base <span class="ui-note">({e(chat.base_name)})</span></h3>
{_answer(chat.base_text)}</div>
</div>"""


def dashboard_page(*, who: str, csrf: str, base_name: str, adapters: Sequence[str], report_html: str,
                   matrix_built: bool, chat: ChatPair | None = None, form: ChatForm | None = None,
                   error: str | None = None, can_logout: bool = True) -> str:
    """The dashboard: who is logged in, the chat box (``form``: what it holds; ``chat``: the answers
    to show), and the report of ``adapters``."""
    if form is None:
        form = ChatForm(chat.model, chat.prompt, str(chat.max_tokens)) if chat is not None else ChatForm()
    logout = (f'<form method="post" action="/ui/logout">{_hidden(csrf)}'
              '<button class="ui-quiet" type="submit">Log out</button></form>') if can_logout else ""
    problem = f'<div class="ui-error">{e(error)}</div>' if error else ""
    matrix = "" if matrix_built or not adapters else f"""
<form method="post" action="/ui/matrix">{_hidden(csrf)}<div class="ui-row">
<button class="ui-quiet" type="submit">Compute the loss matrix</button>
<span class="ui-note">Runs every version on every kept held-out slice (loads a second copy of the base; can take a
while). The page below is built without it.</span></div></form>"""
    return _page("persona dashboard", f"""
<header class="ui-top"><h1>persona</h1>
<span class="ui-meta">base <b>{e(base_name)}</b></span>
<span class="ui-meta">signed in as <b>{e(who)}</b></span>
{logout}</header>
<main class="ui-main">
<section class="ui-card" id="chat"><h2>Try an adapter against the base</h2>
{problem}{_chat_form(csrf, adapters, form)}{_answers(chat) if chat is not None else ""}
</section>
<section class="ui-card" id="report"><h2>What each update did</h2>
{matrix}
{report_html}
</section>
</main>""")


class UiHeaders:
    """Pure ASGI middleware: :data:`UI_HEADERS` on every response under ``/ui`` (pages, redirects, errors)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != "/ui" and not path.startswith("/ui/"):
            return await self.app(scope, receive, send)

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in UI_HEADERS.items() if k.encode() not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
