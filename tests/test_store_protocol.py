"""``persona.store.protocol.StoreView``: the members of ``Store`` the store's job modules use.

The job modules (integrity, lineage, memory, publish, queues, tokens, materialized) type the store
they are handed as ``StoreView`` instead of importing the facade back. Nothing checks a Protocol at
run time, so these tests keep it honest both ways: every member it declares is one of ``Store``'s,
with the same parameters, and every ``store.X`` those modules use is declared.
"""

from __future__ import annotations

import ast
import inspect
from functools import cached_property
from pathlib import Path

from persona.store import Store
from persona.store.protocol import StoreView, TokenRevoker
from persona.store.tokens import TokenStore

STORE = Path(__file__).resolve().parent.parent / "persona" / "store"
JOB_MODULES = ("integrity", "lineage", "memory", "publish", "queues", "tokens", "materialized")


def declared(protocol: type) -> set[str]:
    """The members a Protocol declares (``typing.get_protocol_members`` is Python 3.13's)."""
    typing_own = ("_abc_", "_is_protocol", "_is_runtime_protocol")
    own = {name for name in vars(protocol) if not name.startswith("__") and not name.startswith(typing_own)}
    return own | set(protocol.__annotations__)


def test_every_member_store_view_declares_is_one_of_the_stores_with_its_parameters(tmp_path):
    store = Store(tmp_path)  # reads nothing until asked
    for name in sorted(declared(StoreView)):
        assert hasattr(Store, name) or name in vars(store), f"Store has no {name}"
        wanted = vars(StoreView).get(name)
        if isinstance(wanted, property):
            assert isinstance(inspect.getattr_static(Store, name), (property, cached_property)), name
        elif callable(wanted):
            ours, theirs = inspect.signature(wanted), inspect.signature(getattr(Store, name))
            assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
                (p.name, p.kind, p.default) for p in theirs.parameters.values()], name
    assert set(declared(TokenRevoker)) <= set(dir(TokenStore))
    assert inspect.signature(TokenRevoker.revoke_subject).parameters.keys() == \
        inspect.signature(TokenStore.revoke_subject).parameters.keys()


def _store_members_used(tree: ast.AST) -> set[str]:
    """``X`` of every ``store.X`` and ``self.store.X`` in a module."""
    def is_store(value: ast.expr) -> bool:
        if isinstance(value, ast.Name):
            return value.id == "store"
        return isinstance(value, ast.Attribute) and value.attr == "store" and is_self(value.value)

    def is_self(value: ast.expr) -> bool:
        return isinstance(value, ast.Name) and value.id == "self"

    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and is_store(node.value)}


def test_the_job_modules_use_only_what_store_view_declares():
    members = declared(StoreView)
    for module in JOB_MODULES:
        used = _store_members_used(ast.parse((STORE / f"{module}.py").read_text()))
        assert used, f"{module}: the check found no store.X at all"
        assert used <= members, f"{module} uses Store members StoreView does not declare: {sorted(used - members)}"
