"""``import persona`` and the CLI's cheap commands do not import torch (issue 12, item 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it imported."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft', 'fastapi') if m in sys.modules)))"
    run_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=run_env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _cli_modules(*args: str, env: dict[str, str] | None = None) -> set[str]:
    code = ("import sys\nfrom persona.cli import main\n"
            f"try:\n    main({list(args)!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n")
    return _modules_after(code, env)


def test_import_persona_does_not_import_torch():
    assert _modules_after("import persona") == set()


def test_persona_version_and_help_do_not_import_torch():
    assert _cli_modules("--version") == set()
    assert _cli_modules("--help") == set()
    assert _cli_modules("update", "--help") == set()


def test_persona_list_does_not_import_torch(tmp_path, tiny_base):
    from persona.store.facade import Store

    root = tmp_path / "store"
    Store.init(root, base=tiny_base).create("user:alice")
    assert _cli_modules("list", "--store", str(root)) == set()


def test_a_torch_backed_name_loads_on_first_access():
    assert "torch" in _modules_after("import persona\npersona.Engine")
    assert _modules_after("import persona\npersona.Store, persona.UpdateConfig, persona.SamplingParams") == set()


def test_every_public_name_is_importable_and_listed_once():
    import persona

    assert sorted(persona.__all__) == sorted(persona._NAME_TO_SOURCE) == sorted(set(persona.__all__))
    for name in persona.__all__:
        assert getattr(persona, name) is not None, name
    assert set(persona.__all__) <= set(dir(persona))
    with pytest.raises(AttributeError):
        persona.NoSuchName  # noqa: B018


def test_update_config_keeps_its_old_import_path():
    from persona.training.config import UpdateConfig
    from persona.training.trainer import UpdateConfig as OldPath

    assert OldPath is UpdateConfig

