"""What config values must be, each rule written once: `config.validate` checks them before any work, and
the components that read a value check it again where they are built outside a run (a test, a script).

This module imports neither `birdrounds.config` nor torch, so every module can read the rules (config.py,
checks.py, data/layout.py, train.py) without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the offending key."""


@dataclass(frozen=True)
class Rule:
    """What one config value must be, written once: `validate` checks it before a long run starts, and the
    component that reads the value checks it again where it is built outside a run (a test, a script)."""

    ok: Callable[[Any], bool]
    text: str  # what the value must be, e.g. "must be an integer >= 1"

    def check(self, key: str, value: Any, error: type[Exception] | None = None) -> None:
        """Raise `error` (default ConfigError) with the one line "<key>: <text>, got <value>" when `value` fails."""
        if not self.ok(value):
            raise (error or ConfigError)(f"{key}: {self.text}, got {value!r}")


COUNT = Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1")

AUGMENT_ON = ("workers", "device")  # `data.augment_on`: where data.augment and data.mixup run
# `data.on_missing_file`: what the loader does about a train.csv row whose audio file is missing.
ON_MISSING_FILE = Rule(lambda v: v in ("warn", "error"), "must be 'warn' or 'error'")

# `train.select_by: auto` keeps the best epoch by the first of these a fit computes: the most Kaggle-like first.
SELECTION_ORDER = ("val_soundscape_auc", "val_mixed_auc", "val_clip_auc")
SELECT_BY = ("auto", "last", *SELECTION_ORDER)  # `train.select_by`'s values

# The rules of `train`'s values: `config.validate` checks them before a run, `TrainSettings` where it is built.
TRAIN_RULES = {
    "epochs": COUNT, "batch_size": COUNT, "grad_accum_steps": COUNT, "keep_checkpoints": COUNT, "log_every_steps": COUNT,
    "select_by": Rule(lambda v: v in SELECT_BY, f"must be one of {', '.join(SELECT_BY)}"),
}


# `pseudo.mixing.strategy`'s values, and the arguments each takes from `pseudo.mixing` (birdrounds.mixing).
STRATEGIES = ("mixup_max", "replace", "concat")
STRATEGY_ARGS = {"mixup_max": ["mix_weight"], "replace": ["replace_prob", "class_threshold"], "concat": ["ratio"]}

# `teacher.kind`'s values, here so that `validate` checks them without loading torch (birdrounds.teachers).
TEACHER_KINDS = ("cnn", "probe", "zero_shot", "ensemble")
# `teacher.member`'s values: the external member of teacher=ensemble.
ENSEMBLE_MEMBERS = ("zero_shot", "probe")
# `teacher.external.backend`'s values (birdrounds.external's models).
EXTERNAL_BACKENDS = ("birdnet", "onnx")


def _number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
            integer: bool = False, nullable: bool = False) -> Rule:
    """A Rule for a number (never a bool or a string) within [low, high] (open ends where asked), or null."""
    def ok(v: Any) -> bool:
        if v is None:
            return nullable
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or v != v:
            return False
        return ((low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        text = f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{kind} {'>' if low_open else '>='} {low:g}"
    else:
        text = kind
    return Rule(ok, f"must be {text}{' or null' if nullable else ''}")


# The numbers a run reads, by key pattern (fnmatch, the first that matches): `validate` checks every key of
# the composed tree that matches, so a value with a typo or out of range stops the run before any work in
# one line, instead of a traceback from deep inside (a learning rate of -1 or "abc", a seed "abc").
VALUE_RULES: tuple[tuple[str, Rule], ...] = (
    ("seed", _number(0, integer=True)),
    ("*.seed", _number(0, integer=True, nullable=True)),
    ("model.gem_p", _number(0, low_open=True)),  # GeM's exponent, not a probability
    ("*_p", _number(0, 1, nullable=True)),
    ("*.p", _number(0, 1)),
    ("*.prob", _number(0, 1)),
    ("*drop_rate", _number(0, 1, high_open=True, nullable=True)),
    ("*drop_path_rate", _number(0, 1, high_open=True, nullable=True)),
    ("*.min_lr", _number(0)),
    ("train.optimizer.lr", _number(0, low_open=True)),
    ("teacher.probe.lr", _number(0, low_open=True)),
    ("*.lr", _number(0, low_open=True, nullable=True)),  # pseudo.student_train.lr: null = train's
    ("*.weight_decay", _number(0)),
    ("*.warmup_epochs", _number(0, nullable=True)),
    ("*.restart_epochs", _number(0, low_open=True, nullable=True)),
    ("*num_workers", _number(0, integer=True, nullable=True)),
    ("train.prefetch_factor", _number(1, integer=True, nullable=True)),
    ("train.max_grad_norm", _number(0, low_open=True, nullable=True)),
    ("train.ema_decay", _number(0, 1, high_open=True, nullable=True)),
    ("train.val_batch_size", _number(1, integer=True, nullable=True)),
    ("train.max_steps_per_epoch", _number(1, integer=True, nullable=True)),
    ("pseudo.student_train.epochs", _number(1, integer=True, nullable=True)),
    ("pseudo.stride_s", _number(0, low_open=True)),
    ("pseudo.mixing.mix_weight", _number(0, 1)),
    ("data.clips.secondary_weight", _number(0, 1)),
    ("data.clips.label_smoothing", _number(0, 1, high_open=True)),
    ("data.mixup.weight", _number(0, 1)),
    ("data.sampler.temperature", _number(0)),
    ("teacher.external.threads", _number(1, integer=True)),
    ("teacher.weight", _number(0, 1)),
    ("teacher.probe.epochs", COUNT),
    ("teacher.probe.batch_size", COUNT),
    ("teacher.probe.eval_every", COUNT),
    ("teacher.probe.hidden", _number(0, integer=True)),
    ("teacher.probe.dropout", _number(0, 1, high_open=True)),
    ("teacher.probe.unlabeled_weight", _number(0)),
    ("teacher.probe.balance", _number(0)),
)
