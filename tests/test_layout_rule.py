"""Only ``persona/store/`` touches paths under a store root (issue 12): everyone else asks the Store.

The rule is checked on the syntax tree of every module of ``persona`` outside ``persona/store/``:
no call of the store's path helpers (``adapter_dir``, ``_adapter_dir``, ``_version_dir``), no path
built from a store's ``root`` (``store.root / ...``), no store file name written out in code, and no
import of the store's file-name constants. Messages may still print ``store.root``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "persona"
PATH_HELPERS = {"adapter_dir", "_adapter_dir", "_version_dir"}
# (``persona.json`` is left out: the CLI also uses that string as a click ``ctx.meta`` key.)
STORE_FILES = {"refs.json", "meta.json", "replay.jsonl", "replay.state.json", "pending.jsonl",
               "pending.state.json", "tokens.json", ".retired.json"}
FILE_CONSTANTS = {"REFS", "META", "STORE_FILE", "REPLAY", "REPLAY_STATE", "PENDING", "PENDING_STATE", "TOKENS_FILE",
                  "RETIRED", "LOCKS"}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def violations(source: str, name: str = "<snippet>") -> list[str]:
    """Every place in ``source`` that reaches into a store root instead of asking the Store."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PATH_HELPERS:
            found.append(f"{where}: calls {node.func.attr}()")
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
              and isinstance(node.left, ast.Attribute) and node.left.attr == "root"):
            found.append(f"{where}: builds a path under a store root")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
              and node.value in STORE_FILES):
            found.append(f"{where}: names the store file {node.value!r}")
        elif (isinstance(node, ast.ImportFrom) and "store" in (node.module or "")
              and {a.name for a in node.names} & FILE_CONSTANTS):
            found.append(f"{where}: imports the store's file names {sorted({a.name for a in node.names} & FILE_CONSTANTS)}")
    return found


def test_only_the_store_package_touches_paths_under_a_store_root():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "store" in path.relative_to(PACKAGE).parts[:1]:
            continue
        found += violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, "outside persona/store/, ask the Store instead:\n" + "\n".join(found)


def test_the_layout_rule_catches_each_kind_of_reach():
    """The checker itself can fail: each way code used to reach into the store is flagged."""
    snippet = '''
"""Docstrings may name refs.json."""
from ..store.queues import REPLAY, ReplayBuffer
folder = store.adapter_dir(ref)
other = store._adapter_dir(ref)
raw = (self.store.root / "domain").iterdir()
tokens = read(folder / "tokens.json")
print(f"store {store.root}")
'''
    found = violations(snippet)
    assert len(found) == 5, found
    assert any("REPLAY" in f for f in found) and any("tokens.json" in f for f in found)
    assert not any("refs.json" in f for f in found)  # a docstring is prose, not a path


def test_store_delete_does_not_import_http_code():
    """``store.delete`` revokes tokens through the store's own token store, never the HTTP package."""
    for path in (PACKAGE / "store").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert not module.startswith(("http", "cli", "training", "serving", "compose")), (path, module)
                assert not module.startswith(("persona.http", "persona.cli")), (path, module)
