"""The dashboard (``/ui``, issue 14): who may see it and what each caller sees, the login session
(cookie flags, logout, revocation, CSRF), the side-by-side chat, escaping and the security headers.

In-process through FastAPI's TestClient over one tiny-model engine; the real browser is
``test_ui_browser.py``.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest

from persona import LoraSettings

from conftest import server_world
from test_hostile_http import one_thread  # noqa: F401 - one torch thread for the module (tiny matmuls)

BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    world = server_world(tiny_base, tmp_path_factory, "ui-store")
    yield world
    world["engine"].close()


def client(world, base_url: str = "http://testserver"):
    from fastapi.testclient import TestClient

    return TestClient(world["app"], base_url=base_url, follow_redirects=False)


def bearer(world, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world['tokens'][who]}"}


def login(world, who: str, base_url: str = "http://testserver"):
    """A client holding ``who``'s session cookie, and the page's CSRF token."""
    c = client(world, base_url)
    response = c.post("/ui/login", data={"token": world["tokens"][who]}, headers=BROWSER)
    assert response.status_code == 303 and response.headers["location"] == "/ui", response.text
    page = c.get("/ui", headers=BROWSER)
    assert page.status_code == 200, page.text
    return c, csrf_of(page.text)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no CSRF field"
    return match.group(1)


def adapters_offered(page: str) -> set[str]:
    return set(re.findall(r'<option value="([^"]+)"', page))


# ------------------------------------------------------------------------------------- who sees what
def test_admin_sees_every_adapter_and_a_user_token_only_its_own_and_the_domains(world):
    c = client(world)
    admin = c.get("/ui", headers=bearer(world, "admin"))
    alice = c.get("/ui", headers=bearer(world, "alice"))
    assert admin.status_code == alice.status_code == 200
    assert adapters_offered(admin.text) == {"user:alice", "user:bob", "domain:finance"}
    assert adapters_offered(alice.text) == {"user:alice", "domain:finance"}
    assert "user:bob" not in alice.text  # nowhere on the page: not in the chat box, not in the report
    v1 = {m["id"] for m in c.get("/v1/models", headers=bearer(world, "alice")).json()["data"]}
    assert adapters_offered(alice.text) == v1 - {world["engine"].base_name}  # the scoping of /v1/models


def test_no_token_is_a_401_for_an_api_client_and_the_login_page_for_a_browser(world):
    c = client(world)
    api = c.get("/ui")
    assert api.status_code == 401 and api.json()["error"]["type"] == "authentication_error"
    browser = c.get("/ui", headers=BROWSER)
    assert browser.status_code == 303 and browser.headers["location"] == "/ui/login"
    form = c.get("/ui/login", headers=BROWSER)
    assert form.status_code == 200
    assert '<form method="post" action="/ui/login">' in form.text and 'name="token"' in form.text
    for path in ("/ui/chat", "/ui/logout", "/ui/matrix"):
        assert c.post(path, data={"model": "user:alice", "prompt": "hi"}).status_code == 401, path


def test_a_bad_token_is_a_401_by_header_and_at_login(world):
    c = client(world)
    for token in ("psn_nope_nope", world["tokens"]["alice"] + "x", "not-a-token"):
        assert c.get("/ui", headers={"Authorization": f"Bearer {token}", **BROWSER}).status_code == 401
        refused = c.post("/ui/login", data={"token": token}, headers=BROWSER)
        assert refused.status_code == 401 and "not valid" in refused.text
        assert "set-cookie" not in refused.headers


def test_a_token_in_the_url_query_is_never_read(world):
    c = client(world)
    token = world["tokens"]["admin"]
    for query in (f"token={token}", f"access_token={token}", f"api_key={token}"):
        assert c.get(f"/ui?{query}").status_code == 401
        assert c.get(f"/ui?{query}", headers=BROWSER).headers["location"] == "/ui/login"
        assert c.post(f"/ui/login?{query}", data={"token": ""}, headers=BROWSER).status_code == 401


# ------------------------------------------------------------------------------------ the session
def test_login_sets_an_httponly_samesite_strict_cookie_on_path_ui_holding_no_token(world):
    c = client(world)
    response = c.post("/ui/login", data={"token": world["tokens"]["alice"]}, headers=BROWSER)
    cookie = response.headers["set-cookie"]
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")[1:]}
    assert cookie.startswith("persona_ui=")
    assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/ui"
    assert "secure" not in attributes  # plain http: a Secure cookie would never come back
    value = cookie.split(";")[0].split("=", 1)[1]
    secret = world["tokens"]["alice"].rsplit("_", 1)[1]
    assert len(value) >= 40 and secret not in value and world["tokens"]["alice"].split("_")[1] not in value
    https = client(world, "https://testserver").post("/ui/login", data={"token": world["tokens"]["alice"]},
                                                     headers=BROWSER)
    assert "secure" in https.headers["set-cookie"].lower()


def test_the_session_cookie_opens_the_dashboard_and_logout_ends_it(world):
    c, csrf = login(world, "alice")
    assert adapters_offered(c.get("/ui", headers=BROWSER).text) == {"user:alice", "domain:finance"}
    sid = c.cookies.get("persona_ui")
    out = c.post("/ui/logout", data={"csrf": csrf}, headers=BROWSER)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert 'persona_ui=""' in out.headers["set-cookie"] and "max-age=0" in out.headers["set-cookie"].lower()
    replayed = client(world).get("/ui", headers={"Cookie": f"persona_ui={sid}"})  # the session is gone server-side
    assert replayed.status_code == 401


def test_a_revoked_tokens_session_stops_working(world):
    store = world["store"]
    token, info = store.tokens.create("user:alice")
    c = client(world)
    assert c.post("/ui/login", data={"token": token}, headers=BROWSER).status_code == 303
    assert c.get("/ui").status_code == 200
    store.tokens.revoke(info.token_id)
    assert c.get("/ui").status_code == 401
    assert c.get("/ui", headers=BROWSER).headers["location"] == "/ui/login"


def test_the_v1_api_never_accepts_the_session_cookie(world):
    c, _ = login(world, "admin")
    cookie = {"Cookie": f"persona_ui={c.cookies.get('persona_ui')}"}  # even if a browser sent it outside /ui
    body = {"model": "user:alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client(world).get("/ui", headers=cookie).status_code == 200
    assert client(world).post("/v1/chat/completions", json=body, headers=cookie).status_code == 401
    assert client(world).get("/v1/models", headers=cookie).status_code == 401


def test_posts_without_the_sessions_csrf_token_are_refused(world):
    c, csrf = login(world, "alice")
    _, other = login(world, "alice")  # another session's token
    chat = {"model": "user:alice", "prompt": "hi", "max_tokens": "2"}
    for path in ("/ui/chat", "/ui/matrix", "/ui/logout"):
        for sent in ({}, {"csrf": ""}, {"csrf": other}):
            refused = c.post(path, data={**chat, **sent}, headers=BROWSER)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed", (path, sent)
    cross = c.post("/ui/chat", data={**chat, "csrf": csrf}, headers={"Origin": "https://evil.example", **BROWSER})
    assert cross.status_code == 403
    site = c.post("/ui/chat", data={**chat, "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site", **BROWSER})
    assert site.status_code == 403
    forged_login = client(world).post("/ui/login", data={"token": world["tokens"]["alice"]},
                                      headers={"Origin": "https://evil.example", **BROWSER})
    assert forged_login.status_code == 403 and "set-cookie" not in forged_login.headers
    assert c.get("/ui").status_code == 200  # still logged in: nothing above logged out


# --------------------------------------------------------------------------------------- the chat
def engine_answer(world, model: str, prompt: str, max_tokens: int) -> str:
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    request = GenerationRequest(model=model, messages=({"role": "user", "content": prompt},),
                                params=SamplingParams(max_new_tokens=max_tokens, temperature=0.0))
    return world["engine"].generate([request])[0].text


def answers_on(page: str) -> list[str]:
    return [html.unescape(a) for a in re.findall(r"<pre>(.*?)</pre>", page, re.DOTALL)]


def test_the_chat_answers_with_the_adapter_and_the_base_side_by_side(world):
    c, csrf = login(world, "alice")
    pending = world["store"].show("user:alice").pending
    prompt = "Hello there"
    page = c.post("/ui/chat", data={"csrf": csrf, "model": "user:alice", "prompt": prompt, "max_tokens": "5"},
                  headers=BROWSER)
    assert page.status_code == 200, page.text
    adapter, base = answers_on(page.text)
    assert adapter == engine_answer(world, "user:alice", prompt, 5)
    assert base == engine_answer(world, world["engine"].base_name, prompt, 5)
    assert adapter != base  # the adapter is initialised non-trivially: it changes the answer
    assert "(user:alice@v1)" in page.text  # what ran, pinned
    bearer_page = client(world).post("/ui/chat", data={"model": "domain:finance", "prompt": prompt, "max_tokens": "5"},
                                     headers=bearer(world, "alice"))  # a header is not ambient: no CSRF token needed
    assert answers_on(bearer_page.text)[0] == engine_answer(world, "domain:finance", prompt, 5)
    assert world["store"].show("user:alice").pending == pending  # a trial, not an interaction: never logged


def test_another_users_adapter_is_refused_in_the_chat_as_on_v1(world):
    c, csrf = login(world, "alice")
    for model in ("user:bob", "user:nobody", "user:alice+user:bob*0.01"):
        page = c.post("/ui/chat", data={"csrf": csrf, "model": model, "prompt": "my question", "max_tokens": "2"},
                      headers=BROWSER)
        assert page.status_code == 404 and "does not exist or you do not have access to it" in page.text
        assert ">my question</textarea>" in page.text and "<pre>" not in page.text  # kept to fix; no answers
        assert "user:bob" not in adapters_offered(page.text)
        api = client(world).post("/ui/chat", data={"model": model, "prompt": "hi", "max_tokens": "2"},
                                 headers=bearer(world, "alice"))
        v1 = client(world).post("/v1/chat/completions", headers=bearer(world, "alice"), json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert api.status_code == v1.status_code == 404 and api.json() == v1.json()
    bad = c.post("/ui/chat", data={"csrf": csrf, "model": "user:alice", "prompt": "hi", "max_tokens": "9999"},
                 headers=BROWSER)
    assert bad.status_code == 400 and "max new tokens" in bad.text


def test_user_text_is_escaped_on_the_page(world):
    c, csrf = login(world, "admin")
    hostile = '</textarea><script>alert("x")</script><img src=x onerror=alert(1)>'
    page = c.post("/ui/chat", data={"csrf": csrf, "model": "user:alice", "prompt": hostile, "max_tokens": "2"},
                  headers=BROWSER)
    assert page.status_code == 200
    assert "<script>" not in page.text and "<img src=x" not in page.text
    assert html.escape(hostile, quote=True) in page.text


# ------------------------------------------------------------------------------- headers and URLs
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "srcset", "poster", "data", "xlink:href", "background"}
CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]+)", re.IGNORECASE)


class Urls(HTMLParser):
    """Every URL a page would load or post to: URL attributes, CSS ``url()`` in style attributes and elements."""

    def __init__(self, page: str):
        super().__init__()
        self.found: list[str] = []
        self._in_style = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value:
                self.found.append(value.strip())
            if name == "style" and value:
                self.found += CSS_URL.findall(value)
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.found += CSS_URL.findall(data)


def off_site(page: str) -> list[str]:
    """The URLs that leave the server: anything but a path on it (``/ui/chat``), a fragment or inline data."""
    def local(url: str) -> bool:
        return url.startswith(("#", "data:")) or (url.startswith("/") and not url.startswith("//"))

    return [u for u in Urls(page).found if not local(u)]


def test_ui_responses_carry_the_security_headers_and_no_external_url(world):
    c, csrf = login(world, "admin")
    responses = [c.get("/ui", headers=BROWSER), client(world).get("/ui/login"), client(world).get("/ui"),
                 c.post("/ui/chat", data={"model": "user:alice", "prompt": "hi"}, headers=BROWSER),
                 c.post("/ui/chat", data={"csrf": csrf, "model": "user:alice", "prompt": "hi", "max_tokens": "2"},
                        headers=BROWSER)]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert "script-src" not in csp  # no script at all: default-src 'none' forbids every one
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
    for page in (responses[0].text, responses[1].text, responses[4].text):
        assert off_site(page) == []
        assert "/ui/chat" in Urls(responses[0].text).found  # the check sees the forms' targets
    assert "content-security-policy" not in client(world).get("/healthz").headers  # only the dashboard's


def test_the_url_check_sees_attributes_and_css():
    page = ('<a href="#x">a</a><form action="/ui/chat"></form><img src="https://cdn.example/x.png">'
            '<div style="background:url(//e.example/y)"></div><style>p{background:url("http://e.example/z")}</style>'
            '<link rel="icon" href="data:,">')
    assert off_site(page) == ["https://cdn.example/x.png", "//e.example/y", "http://e.example/z"]


def test_gateway_mode_has_no_dashboard(world, tmp_path):
    """The gateway loads no base to answer the chat's base side with: /ui is a 404 there (after the 401)."""
    from fastapi.testclient import TestClient

    from persona.http.gateway import Gateway, create_gateway_app
    from persona.http.upstream import UpstreamSettings

    gateway = Gateway(world["store"], UpstreamSettings(("http://127.0.0.1:9",)))
    c = TestClient(create_gateway_app(gateway), follow_redirects=False)
    assert c.get("/ui").status_code == 401
    assert c.get("/ui", headers=bearer(world, "admin")).status_code == 404


def test_without_auth_the_dashboard_is_open_but_its_posts_still_need_the_csrf_token(world):
    from fastapi.testclient import TestClient

    from persona.http.app import ServerConfig, create_app

    c = TestClient(create_app(world["engine"], ServerConfig(auth=False)), follow_redirects=False)
    page = c.get("/ui", headers=BROWSER)
    assert page.status_code == 200 and adapters_offered(page.text) == {"user:alice", "user:bob", "domain:finance"}
    assert c.post("/ui/chat", data={"model": "user:bob", "prompt": "hi"}, headers=BROWSER).status_code == 403
    ok = c.post("/ui/chat", data={"csrf": csrf_of(page.text), "model": "user:bob", "prompt": "hi", "max_tokens": "2"},
                headers=BROWSER)
    assert ok.status_code == 200 and len(answers_on(ok.text)) == 2


# ---------------------------------------------------------------------------------------- sessions
def test_sessions_expire_and_are_bounded():
    from persona.http.sessions import SessionStore
    from persona.store.tokens import Scope

    now = [0.0]
    sessions = SessionStore(ttl_s=10, max_sessions=3, clock=lambda: now[0])
    first = sessions.create(Scope("t1", "admin"))
    assert sessions.get(first.sid) == first and sessions.get(None) is None and sessions.get("x") is None
    now[0] = 10.0
    assert sessions.get(first.sid) is None  # expired, and forgotten
    made = [sessions.create(None) for _ in range(5)]
    assert len(sessions) == 3 and sessions.get(made[0].sid) is None and sessions.get(made[-1].sid) == made[-1]
    assert made[-1].csrf_matches(made[-1].csrf) and not made[-1].csrf_matches(made[-2].csrf)
    assert not made[-1].csrf_matches(None) and made[-1].csrf != made[-1].sid


# ------------------------------------------------------------------------------------------ report
def test_the_report_is_persona_reports_body_for_the_visible_adapters_and_cached_until_the_store_changes(world):
    from persona.report import build_report, render_report_body

    store = world["store"]
    c = client(world)
    page = c.get("/ui", headers=bearer(world, "alice")).text
    body = render_report_body(build_report(store, ["user:alice", "domain:finance"], matrix=False), heading=False)
    strip = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC|-p[0-9a-f]{10}\b")  # time stamp, matplotlib's clip-path ids
    assert strip.sub("", body) in strip.sub("", page) and "user:bob" not in page
    builds = world["app"].state.persona.reports.builds
    assert c.get("/ui", headers=bearer(world, "alice")).status_code == 200
    assert world["app"].state.persona.reports.builds == builds  # cached: nothing changed
    store.create("domain:travel", LoraSettings(init="random", seed=4, rank=4))
    try:
        page = c.get("/ui", headers=bearer(world, "alice")).text
        assert world["app"].state.persona.reports.builds == builds + 1 and "domain:travel" in page
    finally:
        store.delete("domain:travel")


def test_the_loss_matrix_is_built_on_request_and_then_shown(world):
    c, csrf = login(world, "admin")
    page = c.get("/ui", headers=BROWSER).text
    assert "Compute the loss matrix" in page and str(world["store"].root) not in page  # no server path on the page
    built = c.post("/ui/matrix", data={"csrf": csrf}, headers=BROWSER)
    assert built.status_code == 200 and "Compute the loss matrix" not in built.text
    assert "Compute the loss matrix" not in c.get("/ui", headers=BROWSER).text  # cached, and preferred
