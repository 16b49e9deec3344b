import json

import pytest
from click.testing import CliRunner

from persona.store import NewVersion
from persona.cli.main import main

from test_refs import HOSTILE_NAMES


@pytest.fixture
def cli(run_cli):
    return run_cli


def test_init_create_show_list_json(cli, isolated_store):
    out = json.loads(cli("create", "user:alice", "--rank", 4, "--json").output)
    assert out["adapter"] == "user:alice" and out["version"] == 1 and out["lora"]["rank"] == 4
    cli("create", "domain:finance", "--targets", "q_proj,v_proj")
    listed = json.loads(cli("list", "--json").output)
    assert [(a["adapter"], a["current"]) for a in listed] == [("user:alice", 1), ("domain:finance", 1)]
    shown = json.loads(cli("show", "domain:finance", "--json").output)
    assert shown["versions"][0]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    text = cli("list").output
    assert "user:alice" in text and "domain:finance" in text
    assert (isolated_store / "user" / "alice" / "v0001" / "adapter_model.safetensors").is_file()


def test_store_flag_overrides_env(cli, tiny_base, tmp_path):
    other = tmp_path / "elsewhere"
    cli("init", "--base", tiny_base, "--store", other)
    cli("create", "user:zed", "--store", other)
    assert (other / "user" / "zed" / "v0001").is_dir()
    assert "user:zed" not in cli("list").output


def test_alias_rollback_delete(cli, isolated_store):
    from persona import Store

    cli("create", "user:alice")
    store = Store.open(isolated_store)
    loaded = store.load("user:alice")
    store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1))
    assert json.loads(cli("rollback", "user:alice", "v1", "--json").output)["current"] == 1
    cli("alias", "user:alice", "stable", "v2")
    assert store.aliases("user:alice") == {"current": 1, "stable": 2}
    cli("alias", "user:alice", "stable", "--remove")
    assert store.aliases("user:alice") == {"current": 1}
    refused = cli("delete", "user:alice", ok=False)
    assert refused.exit_code != 0 and "--yes" in refused.output
    cli("delete", "user:alice", "--yes")
    assert not (isolated_store / "user" / "alice").exists()


def test_errors_are_one_line_without_traceback(cli):
    for args, fragment in [
        (("show", "user:nobody"), "persona create user:nobody"),
        (("create", "User:Alice"), "kind must be one of"),
        (("rollback", "user:nobody", "v1"), "no adapter"),
        (("show", "user:x@v0"), "versions start at v1"),
    ]:
        result = cli(*args, ok=False)
        assert result.exit_code == 1, result.output
        assert fragment in result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_uninitialised_store_tells_the_fix(tmp_path):
    result = CliRunner().invoke(main, ["list", "--store", str(tmp_path / "none")])
    assert result.exit_code == 1 and "persona init" in result.output


def test_hostile_names_rejected_by_cli(cli, tmp_path):
    before = {str(p) for p in tmp_path.rglob("*")}
    for name in HOSTILE_NAMES:
        if "@" in name:
            continue  # user:a@b is a legal reference to alias b of adapter a
        result = cli("create", f"user:{name}", ok=False)
        assert result.exit_code != 0, name
        assert "Traceback" not in result.output
    after = {str(p) for p in tmp_path.rglob("*")}
    assert after == before


def test_verify_exit_code_reflects_tampering(cli, isolated_store):
    cli("create", "user:alice")
    assert json.loads(cli("verify", "--json").output)["ok"] is True
    cfg = isolated_store / "user" / "alice" / "v0001" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 8', '"r": 9'))
    result = cli("verify", ok=False)
    assert result.exit_code == 1 and "adapter_config.json" in result.output and "sha256" in result.output


def test_base_command(cli, tiny_base):
    info = json.loads(cli("base", "--json").output)
    assert info["id"] == tiny_base and info["num_layers"] == 2 and info["fingerprint"].startswith("sha256:")


def test_help_teaches(cli):
    out = cli("--help").output
    assert "KIND:NAME" in out and "persona create user:alice" in out
    assert "--targets" in cli("create", "--help").output


def test_create_from_prints_the_source_adapters_rank_not_the_options(cli):
    cli("create", "domain:finance", "--rank", 16)
    line = cli("create", "user:x", "--from", "domain:finance").output
    assert "(rank 16;" in line, line
    assert json.loads(cli("show", "user:x", "--json").output)["versions"][0]["lora"]["rank"] == 16
    refused = cli("create", "user:y", "--from", "domain:finance", "--rank", 4, ok=False)
    assert refused.exit_code == 2 and "--rank does not apply" in refused.output


def _all_commands(group, prefix=()):
    import click

    for name, command in sorted(group.commands.items()):
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _all_commands(command, prefix + (name,))


def test_every_command_help_has_examples(cli):
    commands = list(_all_commands(main))
    assert len(commands) >= 21  # 18 commands, token's 3 subcommands
    missing = [" ".join(path) for path, _ in commands if "Examples:" not in cli(*path, "--help").output]
    assert missing == []


def test_json_errors_are_a_json_object_on_stderr(cli, tmp_path):
    for args, error_type, fragment in [
        (("show", "user:nobody", "--json"), "AdapterNotFound", "persona create user:nobody"),
        (("log", "user:nobody", "--data", tmp_path / "missing.jsonl", "--json"), "FileNotFoundError", "missing.jsonl"),
        (("rollback", "user:nobody", "--json"), "MissingParameter", "VERSION"),
        (("create", "User:Alice", "--json"), "InvalidReference", "kind must be one of"),
    ]:
        result = cli(*args, ok=False)
        assert result.exit_code != 0 and result.stdout == "", result.output
        error = json.loads(result.stderr)["error"]
        assert set(error) == {"type", "message"}
        assert error["type"] == error_type and fragment in error["message"], error
    plain = cli("show", "user:nobody", ok=False)
    assert plain.stderr.startswith("Error: ") and "{" not in plain.stderr


def test_show_draws_a_sparkline_of_held_out_loss_across_updates(cli, isolated_store):
    from persona import Store
    from persona.cli.adapters import sparkline

    assert sparkline([4.0, 2.0, 1.0, 0.5]) == "█▄▂▁" and sparkline([1.0, 1.0]) == "▁▁" and sparkline([]) == ""
    assert sparkline([1.0, float("nan"), 3.0]) == "▁ █"
    cli("create", "user:alice")
    assert "held-out loss after each update" not in cli("show", "user:alice").output  # nothing trained yet
    store = Store.open(isolated_store)
    loaded = store.load("user:alice")
    for version, loss in ((1, 3.2), (2, 1.6), (3, 0.4)):
        store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=version,
                                                       metrics={"heldout_loss_after": loss}))
    line = next(l for l in cli("show", "user:alice").output.splitlines() if "held-out loss after each update" in l)
    assert "█▄▁" in line and "3.2 -> 0.4" in line and "v0002..v0004" in line
