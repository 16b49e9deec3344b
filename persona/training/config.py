"""How an update trains and when its result becomes ``current``: :class:`UpdateConfig`, torch-free;
and how ``update --all`` packs many adapters' steps into shared batches: :class:`BulkConfig`.

Each field's ``metadata`` carries its ``help`` and, where ``__post_init__`` validates one, its
``range`` (keyword arguments of ``click.IntRange``/``click.FloatRange``): the ``persona update``
options are generated from them (:func:`persona.cli._common.options_from`), so a default, a
range or a help text is written once, here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from ..errors import InvalidConfig, refuse_unknown_keys
from .supersede import SUPERSEDE_THRESHOLD

# An update of fewer rows holds none out, so its gate has no evidence and it can only become a candidate.
HOLDOUT_MIN_ROWS = 4

FORGETTING_FLOOR = 0.05
"""Replay-loss rise (nats per token) that never counts as forgetting: the kept answers' tokens lose
at most ~5% of their probability (exp(-0.05) = 0.95). A relative bound alone fails on a replay loss
near zero: benchmarks/revision.py measured a kept-row rise of 0.0009 -> 0.0119 nats (+1208%) while
every unchanged fact still won; see docs/TRAINING.md."""


@dataclass(frozen=True)
class UpdateConfig:
    """How an update trains and when its result becomes ``current``.

    >>> UpdateConfig(epochs=1, learning_rate=2e-3).batch_size
    8
    """

    epochs: int = field(default=3, metadata={"help": "Passes over the new data.", "range": {"min": 1, "max": 1000}})
    max_steps: int | None = field(default=None, metadata={
        "help": "Stop after this many optimizer steps.", "range": {"min": 1}})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "AdamW learning rate of the LoRA factors.", "range": {"min": 0, "max": 1, "min_open": True}})
    batch_size: int = field(default=8, metadata={
        "help": "New-data rows per step (replayed rows come on top).", "range": {"min": 1, "max": 4096}})
    seed: int = field(default=0, metadata={"help": "Seed of the split, shuffling, dropout and replay sampling."})
    holdout_fraction: float = field(default=0.1, metadata={
        "help": "Held-out share of the new data.", "range": {"min": 0, "max": 1, "max_open": True}})
    max_length: int = field(default=512, metadata={
        "help": "Tokens per example (longer ones are truncated and counted).", "range": {"min": 8}})
    replay_fraction: float = field(default=0.5, metadata={
        "help": "Rows replayed from the adapter's past interactions, added to each batch as a share of the batch size.",
        "range": {"min": 0, "max": 1}})
    replay_capacity: int = field(default=256, metadata={
        "help": "Interactions kept in the adapter's replay buffer.", "range": {"min": 0}})
    gate_replay_samples: int = field(default=32, metadata={
        "help": "Replay examples (a seeded sample) the gate evaluates on.", "range": {"min": 1}})
    reg: Literal["none", "l2", "ewc"] = field(default="none", metadata={
        "help": "Pull the weights toward the parent version (replay already guards against forgetting; "
                "see docs/TRAINING.md)."})
    reg_strength: float = field(default=0.1, metadata={
        "help": "Weight of the pull toward the parent (Fisher normalized to mean 1 for ewc).", "range": {"min": 0}})
    max_forgetting: float = field(default=0.05, metadata={
        "help": "Allowed relative rise of the replay loss for promotion.", "range": {"min": 0}})
    forgetting_floor: float = field(default=FORGETTING_FLOOR, metadata={
        "help": "Allowed absolute rise of the replay loss, nats per token (the larger of the two bounds applies).",
        "range": {"min": 0, "max": 10}})
    supersede: bool = field(default=True, metadata={
        "help": "Leave replay rows that the new data revises (same question, different answer) out of replay "
                "and the gate."})
    supersede_threshold: float = field(default=SUPERSEDE_THRESHOLD, metadata={
        "help": "Question score from which a revised row counts as the same question (see docs/TRAINING.md).",
        "range": {"min": -1, "max": 1}})
    replay_recency: float = field(default=1.0, metadata={
        "help": "Sampling weight of the newest replay row over the oldest (1: uniform).", "range": {"min": 1, "max": 1000}})
    force: bool = field(default=False, metadata={"help": "Make the new version current whatever the gate says."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max gradient norm."})
    fisher_samples: int = field(default=32, metadata={"help": "Examples used for the EWC Fisher estimate."})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "Training compute: auto is bf16 autocast where the hardware has native bf16 (AVX512-BF16/AMX CPUs, "
                "CUDA), else fp32. The LoRA factors and optimizer state stay fp32 (the frozen base's dtype is --dtype)."})

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InvalidConfig(what)

        need(isinstance(self.epochs, int) and 1 <= self.epochs <= 1000, f"epochs must be in 1..1000, got {self.epochs!r}")
        need(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1), f"max_steps must be >= 1, got {self.max_steps!r}")
        need(isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1, f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        need(isinstance(self.batch_size, int) and 1 <= self.batch_size <= 4096, f"batch_size must be in 1..4096, got {self.batch_size!r}")
        need(0 <= self.holdout_fraction < 1, f"holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}")
        need(isinstance(self.max_length, int) and self.max_length >= 8, f"max_length must be >= 8, got {self.max_length!r}")
        need(0 <= self.replay_fraction <= 1, f"replay_fraction must be in [0, 1], got {self.replay_fraction!r}")
        need(isinstance(self.replay_capacity, int) and self.replay_capacity >= 0, "replay_capacity must be >= 0")
        need(isinstance(self.gate_replay_samples, int) and self.gate_replay_samples >= 1, "gate_replay_samples must be >= 1")
        need(self.reg in ("none", "l2", "ewc"), f"reg must be none, l2 or ewc, got {self.reg!r}")
        need(self.reg_strength >= 0, "reg_strength must be >= 0")
        need(self.max_forgetting >= 0, "max_forgetting must be >= 0")
        need(isinstance(self.forgetting_floor, (int, float)) and 0 <= self.forgetting_floor <= 10,
             f"forgetting_floor must be in [0, 10] nats, got {self.forgetting_floor!r}")
        need(isinstance(self.supersede, bool), f"supersede must be true or false, got {self.supersede!r}")
        need(isinstance(self.supersede_threshold, (int, float)) and -1 <= self.supersede_threshold <= 1,
             f"supersede_threshold must be in [-1, 1], got {self.supersede_threshold!r}")
        need(isinstance(self.replay_recency, (int, float)) and 1 <= self.replay_recency <= 1000,
             f"replay_recency must be in [1, 1000], got {self.replay_recency!r}")
        need(self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {self.precision!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UpdateConfig":
        refuse_unknown_keys(cls, data, "update option")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BulkConfig:
    """How ``update --all`` packs adapters' steps into shared batches.

    >>> BulkConfig(rows_per_step=0).sequential
    True
    >>> BulkConfig(tokens_per_step=4096).sequential
    False
    """

    # Default 0 (one after another): on the 2-core CPU the shared steps measured 0.56x the speed and 3.4x the
    # peak memory of one adapter after another at 8 users (docs/BENCHMARKS.md); they are for GPUs, where a
    # batch of 8 short chats leaves most of the chip idle. Not yet measured on a GPU.
    rows_per_step: int = field(default=0, metadata={
        "help": "Rows per shared training step across adapters (each adapter's batch whole: batch size + replayed "
                "rows), e.g. 64 on a GPU; 0 (the default) trains one adapter after another, which measured "
                "faster and leaner on a CPU.", "range": {"min": 0}})
    tokens_per_step: int = field(default=0, metadata={
        "help": "Padded tokens per shared training step (rows x the step's longest row), e.g. 4096: bounds a step's "
                "activations, so its memory, whatever the rows' lengths; 0 (the default): no token cap. With "
                "--rows-per-step 0 it alone packs the adapters.", "range": {"min": 0}})
    max_adapters_per_step: int = field(default=8, metadata={
        "help": "Adapters trained at once (open updates; each holds its factors and optimizer state).",
        "range": {"min": 1}})

    def __post_init__(self) -> None:
        if not isinstance(self.rows_per_step, int) or self.rows_per_step < 0:
            raise InvalidConfig(f"rows_per_step must be >= 0, got {self.rows_per_step!r}")
        if not isinstance(self.tokens_per_step, int) or self.tokens_per_step < 0:
            raise InvalidConfig(f"tokens_per_step must be >= 0, got {self.tokens_per_step!r}")
        if not isinstance(self.max_adapters_per_step, int) or self.max_adapters_per_step < 1:
            raise InvalidConfig(f"max_adapters_per_step must be >= 1, got {self.max_adapters_per_step!r}")

    @property
    def sequential(self) -> bool:
        """No budget at all: one adapter after another."""
        return self.rows_per_step == 0 and self.tokens_per_step == 0
