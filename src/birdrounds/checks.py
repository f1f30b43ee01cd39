"""Is a round's model worth using? Read from its metrics.json alone, so the rounds, the report and export agree.

A model is **not usable** when its selection score is within noise of chance (the 95% bootstrap interval
of the score `birdrounds.train` kept it by reaches 0.5) or when its weights had too few optimizer steps
since random initialisation to have learned anything. A usable round can still deserve a **note**: its
kept model scores below the model it started from, so the round made things worse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from birdrounds.rules import SELECT_BY, SELECTION_ORDER, TRAIN_RULES  # noqa: F401  (re-exported)

# Fewer optimizer updates than this since random initialisation (a student counts its teacher's too):
# the 64-recording teacher that stayed at chance had ~40; the synthetic demo's teacher has 320.
MIN_STEPS = 300
CHANCE_AUC = 0.5
SCHEDULE_KEYS = "data.sampler.samples_per_epoch or train.epochs"
@dataclass
class RoundChecks:
    """`problems` make a model not usable (export refuses it unless forced); `notes` are worth a line."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems

    def as_record(self) -> dict[str, Any]:
        return {"usable": self.usable, "problems": list(self.problems), "notes": list(self.notes)}


def lineage_steps(metrics: Mapping[str, Any]) -> int:
    """Optimizer steps since random initialisation: the fit's own plus those of the model it was started from."""
    start = metrics.get("start") or {}
    return int(start.get("steps_since_init") or 0) + int(metrics.get("step") or 0)


def selection_score(metrics: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """(metric name, value) the round's model was kept by; (None, None) for records made before selection."""
    key = (metrics.get("selection") or {}).get("selected_by")
    value = metrics.get(key) if key else None
    return key, (float(value) if value is not None and math.isfinite(value) else None)


def round_checks(metrics: Mapping[str, Any]) -> RoundChecks:
    """The problems and notes of one fit's metrics.json (teacher, student or control)."""
    checks = RoundChecks()
    selection = metrics.get("selection") or {}
    key, score = selection_score(metrics)
    if key is not None:
        interval = selection.get("interval_95")
        if score is None:
            checks.problems.append(f"{key} could not be computed (no class with both positives and negatives)")
        elif interval and interval[0] <= CHANCE_AUC:
            checks.problems.append(
                f"{key} {score:.3f} is within noise of chance (95% bootstrap interval {interval[0]:.3f}-"
                f"{interval[1]:.3f} reaches {CHANCE_AUC}): raise {SCHEDULE_KEYS}, or check the labels")
    steps = lineage_steps(metrics)
    # An external teacher's steps are its head's: the model under it was trained elsewhere.
    if "step" in metrics and steps < MIN_STEPS and not metrics.get("external_teacher"):
        checks.problems.append(f"only {steps} optimizer steps since random initialisation (fewer than {MIN_STEPS}): "
                               f"raise {SCHEDULE_KEYS}")
    start = metrics.get("start") or {}
    start_score = (start.get("scores") or {}).get(key) if key else None
    if score is not None and start_score is not None and score < start_score:
        checks.notes.append(f"{key} {score:.3f} is below its starting model's {start_score:.3f} ({start.get('model')})")
    return checks
