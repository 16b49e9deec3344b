"""The CLI's defaults, ranges and help come from the config dataclasses (issue 12, item 6).

Every option generated from a dataclass field must have that field's default; the options a command
takes for UpdateConfig, LoraSettings and SamplingParams must all be generated (a hand-written one
could drift, as ``create --from`` once printed the default rank 8 for a rank-16 source).
"""

from __future__ import annotations

import dataclasses

import click
import pytest

from persona.base import Placement
from persona.cli import main
from persona.cli._common import FieldOption
from persona.peft_format import LoraSettings
from persona.serving.memory import MemoryConfig
from persona.serving.sampling import SamplingParams
from persona.training.config import BulkConfig, UpdateConfig

# (command path, option) -> (dataclass, field) that each must be generated from
EXPECTED = {
    ("create", "--rank"): (LoraSettings, "rank"),
    ("create", "--alpha"): (LoraSettings, "alpha"),
    ("create", "--dropout"): (LoraSettings, "dropout"),
    ("create", "--targets"): (LoraSettings, "target_modules"),
    ("create", "--init"): (LoraSettings, "init"),
    ("create", "--seed"): (LoraSettings, "seed"),
    **{("update", opt): (UpdateConfig, name) for opt, name in {
        "--epochs": "epochs", "--max-steps": "max_steps", "--lr": "learning_rate", "--batch-size": "batch_size",
        "--seed": "seed", "--holdout": "holdout_fraction", "--replay": "replay_fraction", "--reg": "reg",
        "--reg-strength": "reg_strength", "--max-forgetting": "max_forgetting",
        "--forgetting-floor": "forgetting_floor", "--max-length": "max_length", "--precision": "precision",
        "--force": "force", "--supersede": "supersede", "--supersede-threshold": "supersede_threshold",
        "--replay-recency": "replay_recency"}.items()},
    ("update", "--rows-per-step"): (BulkConfig, "rows_per_step"),
    ("update", "--tokens-per-step"): (BulkConfig, "tokens_per_step"),
    ("update", "--max-adapters-per-step"): (BulkConfig, "max_adapters_per_step"),
    ("eval", "--max-length"): (UpdateConfig, "max_length"),
    ("report", "--max-length"): (UpdateConfig, "max_length"),
    **{(cmd, opt): (SamplingParams, name) for cmd in ("generate", "chat") for opt, name in {
        "--max-new-tokens": "max_new_tokens", "--temperature": "temperature", "--top-p": "top_p",
        "--seed": "seed", "--stop": "stop"}.items()},
    # the retrieval memory's settings (issue 16): every command that builds prompts
    **{(cmd, opt): (MemoryConfig, name) for cmd in ("serve", "generate", "chat")
       for opt, name in {"--memory-k": "k", "--memory-tokens": "max_tokens", "--memory-retrieval": "retrieval"}.items()},
    # where the base runs (issue 13): every command that loads it, from one dataclass
    **{(cmd, opt): (Placement, name) for cmd in ("serve", "generate", "chat", "update", "eval", "report", "route")
       for opt, name in {"--device": "device", "--dtype": "dtype"}.items()},
}


def _commands(group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


def _field_options():
    for path, command in _commands(main):
        for param in command.params:
            if isinstance(param, FieldOption):
                yield " ".join(path), param


def test_every_generated_option_default_is_its_dataclass_field_default():
    checked = 0
    for path, option in _field_options():
        cls, name = option.source
        field = {f.name: f for f in dataclasses.fields(cls)}[name]
        assert option.default == field.default, (path, option.opts, option.default, field.default)
        assert option.help == field.metadata["help"], (path, option.opts)
        bounds = field.metadata.get("range")
        if bounds:  # the option refuses what the dataclass refuses
            for key in ("min", "max", "min_open", "max_open"):
                assert getattr(option.type, key) == bounds.get(key, False if key.endswith("open") else None), \
                    (path, option.opts, key)
        checked += 1
    assert checked == len(EXPECTED)


def test_every_config_option_is_generated_from_its_field():
    found = {(path, option.opts[0]): option.source for path, option in _field_options()}
    assert found == EXPECTED


@pytest.mark.parametrize("cls", [UpdateConfig, BulkConfig, LoraSettings, SamplingParams, Placement])
def test_every_config_field_has_help_metadata(cls):
    assert [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")] == []


def test_an_out_of_range_value_is_refused_by_the_option_as_by_the_dataclass(run_cli):
    refused = run_cli("update", "user:alice", "--lr", "2", ok=False)
    assert refused.exit_code == 2 and "--lr" in refused.output
    with pytest.raises(Exception, match="learning_rate"):
        UpdateConfig(learning_rate=2)


def test_create_targets_option_gives_the_settings_a_tuple(run_cli):
    import json

    out = json.loads(run_cli("create", "user:alice", "--targets", "q_proj, v_proj", "--rank", 2, "--json").output)
    assert out["lora"]["target_modules"] == ["q_proj", "v_proj"] and out["lora"]["rank"] == 2
