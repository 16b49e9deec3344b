"""The one error table (issue 12, item 4): every public error has a row, the server and the CLI read
only that row, and a client sees what the row says: an integrity failure is a 500 that does not
tell an API client to run a CLI command (the server's log does), a lock timeout a 503, a bad
request a 400."""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import replace

import httpx
import pytest

import persona.errors as errors
from persona import LoraSettings, Store
from persona.errors import ERROR_TABLE, PersonaError, mapping_for
from persona.store.tokens import TokenStore

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
# every package that defines or raises errors: importing them registers their PersonaError subclasses
MODULES = ("persona.http.app", "persona.cli.main", "persona.store", "persona.serving.engine", "persona.compose.merge",
           "persona.compose.route", "persona.training.trainer")


def all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from all_subclasses(sub)


# ------------------------------------------------------------------------------------- the table
def test_every_error_class_in_errors_py_has_its_own_row():
    public = {c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, PersonaError)}
    assert public - set(ERROR_TABLE) == set()
    assert set(ERROR_TABLE) <= public


def test_every_persona_error_lives_in_errors_py():
    """AuthError (store/tokens.py), EngineClosed (serving/scheduler.py) and AdapterHasDependents
    (store/facade.py) used to live beside their raisers, outside the table."""
    for name in MODULES:
        importlib.import_module(name)
    strays = {f"{c.__module__}.{c.__qualname__}" for c in all_subclasses(PersonaError)
              if c.__module__ != "persona.errors" and not c.__module__.startswith(("test", "tests"))}
    assert strays == set()


def test_moved_errors_stay_importable_where_they_were():
    from persona.serving.engine import EngineClosed
    from persona.store import AdapterHasDependents
    from persona.store.tokens import AuthError

    assert (AuthError, EngineClosed, AdapterHasDependents) == (errors.AuthError, errors.EngineClosed,
                                                              errors.AdapterHasDependents)


def test_invalid_config_cases_are_told_apart_and_still_invalid_config():
    for cls, status in ((errors.InvalidRequest, 400), (errors.UnsupportedAdapter, 500),
                        (errors.CapacityExceeded, 503)):
        assert issubclass(cls, errors.InvalidConfig) and issubclass(cls, ValueError)
        assert mapping_for(cls).http_status == status
    assert mapping_for(errors.InvalidConfig("x")).http_status == 400


def test_server_side_faults_hide_their_operator_message():
    for cls in (errors.IntegrityError, errors.DamagedAdapter, errors.StoreDamaged, errors.UnsafeWeightFile):
        row = mapping_for(cls)
        assert row.http_status == 500 and row.client_message and "persona " not in row.client_message


def test_damaged_store_file_raises_store_damaged_not_a_bare_persona_error(tmp_path):
    (tmp_path / "persona.json").write_text("{not json")
    with pytest.raises(errors.StoreDamaged, match="damaged"):
        Store(tmp_path).config
    (tmp_path / "persona.json").write_text('{"format": 999}')
    with pytest.raises(errors.UnsupportedStoreFormat, match="format"):
        Store(tmp_path).config


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("error", [errors.LockTimeout("held"), errors.IntegrityError("sha256 mismatch"),
                                   errors.AuthError("no token")])
def test_cli_exit_code_is_the_tables(error):
    from persona.cli._common import to_cli_error

    assert to_cli_error(error, as_json=False).exit_code == mapping_for(error).exit_code == 1


def test_cli_reads_the_exit_code_from_the_table(monkeypatch):
    from persona.cli._common import to_cli_error

    monkeypatch.setitem(ERROR_TABLE, errors.LockTimeout, replace(ERROR_TABLE[errors.LockTimeout], exit_code=75))
    assert to_cli_error(errors.LockTimeout("held"), as_json=True).exit_code == 75
    assert to_cli_error(errors.DamagedAdapter("bad meta"), as_json=True).exit_code == 1  # IntegrityError's row


# -------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    from persona.http.app import ServerConfig, create_app
    from persona.serving.engine import Engine
    from conftest import loopback_server

    store = Store.init(tmp_path_factory.mktemp("errors-table"), base=tiny_base)
    for ref, seed in (("user:alice", 1), ("user:tampered", 2)):
        store.create(ref, LoraSettings(init="random", seed=seed, rank=4))
    token = TokenStore(store).create("admin")[0]
    weights = store.root / "user" / "tampered" / "v0001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor: the recorded sha256 no longer matches
    weights.write_bytes(bytes(data))
    engine = Engine(store, max_resident=4, max_batch=8)
    with loopback_server(create_app(engine, ServerConfig(auth=True))) as url:
        yield {"url": url, "token": token, "engine": engine}
    engine.close()


def chat(served, model, **fields):
    return httpx.post(served["url"] + "/v1/chat/completions", json={**CHAT, "model": model, **fields},
                      headers={"Authorization": f"Bearer {served['token']}"}, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_tampered_adapter_is_a_500_that_names_no_cli_command(served, caplog, stream):
    caplog.set_level(logging.ERROR, logger="persona.http.app")
    response = chat(served, "user:tampered", stream=stream)
    if stream and response.status_code == 200:  # refused once streaming began: the error event carries it
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        error = httpx.Response(200, content=events[-2]).json()["error"]
    else:
        assert response.status_code == 500, response.text
        error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "adapter_damaged"
    assert "persona verify" not in response.text and "sha256" not in response.text
    assert any("persona verify" in r.getMessage() for r in caplog.records if r.name == "persona.http.app")


def test_lock_timeout_is_a_503_with_retry_after(served, monkeypatch):
    def held(model):
        raise errors.LockTimeout("another writer has held user:alice's lock for over 600s")

    monkeypatch.setattr(served["engine"], "check", held)
    response = chat(served, "user:alice")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "server_error" and response.json()["error"]["code"] == "store_busy"


def test_capacity_limit_in_the_engine_is_a_503(served, monkeypatch):
    def full(request):
        raise errors.CapacityExceeded("a batch needs more than max_resident=4 adapters at once")

    monkeypatch.setattr(served["engine"], "submit", full)
    assert chat(served, "user:alice").status_code == 503


@pytest.mark.parametrize("fields, param", [
    ({"seed": -1}, "seed"),                       # SamplingParams refuses it: InvalidConfig from the library
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),  # refused by the server before the engine
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
])
def test_bad_request_is_a_400_naming_the_field(served, fields, param):
    response = chat(served, "user:alice", **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error" and response.json()["error"]["param"] == param


def test_unknown_adapter_is_a_404_and_a_malformed_one_a_400(served):
    assert chat(served, "user:nobody").json()["error"]["code"] == "model_not_found"
    malformed = chat(served, "user:Alice")
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_model"


def test_authentication_runs_once_per_request(served, monkeypatch):
    """It ran twice: once in the middleware, once more in the route."""
    calls = []
    authenticate = TokenStore.authenticate
    monkeypatch.setattr(TokenStore, "authenticate", lambda self, bearer: calls.append(1) or authenticate(self, bearer))
    assert chat(served, "user:alice").status_code == 200
    assert len(calls) == 1
    calls.clear()
    assert httpx.get(served["url"] + "/v1/models", headers={"Authorization": f"Bearer {served['token']}"}).status_code == 200
    assert len(calls) == 1


def test_openapi_schema_stays_behind_authentication(served):
    assert httpx.get(served["url"] + "/openapi.json").status_code == 401
    schema = httpx.get(served["url"] + "/openapi.json", headers={"Authorization": f"Bearer {served['token']}"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
