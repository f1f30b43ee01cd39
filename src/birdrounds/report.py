"""The run folder's report: `report.md` (one row per completed round), `report.png` and `metrics.json`.

Built from the round records alone (`round_k/metrics.json`, `manifest.json`, `pseudo_labels.parquet`,
and `round_k/control/` where the round has an equal-compute control), so it can be rewritten at any
time, e.g. after each round or by hand on a copied run folder. A student's gain over its control
(`gain_vs_control`) is what the pseudo-labels bought; its change against the previous round also
counts the extra training.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from birdrounds.artifacts import (
    CONTROL_DIR,
    DONE_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    PREDICT_RECORD,
    PSEUDO_FILE,
    REPORT_FILE,
    REPORT_PLOT_FILE,
    SUMMARY_FILE,
    atomic_open,
    write_json_atomic,
)
from birdrounds.checks import round_checks, selection_score

log = logging.getLogger(__name__)

# val_mixed_auc: held-out calls in quiet train-soundscape backgrounds (data/mixed_val.py); absent in older runs.
AUC_KEYS = ("val_soundscape_auc", "val_clip_auc", "val_mixed_auc")


def completed_rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """(round index, folder) of every completed round (a DONE marker), in order; set-aside folders skipped."""
    rounds = []
    for folder in run_dir.glob("round_*"):
        suffix = folder.name.removeprefix("round_")
        if suffix.isdigit() and (folder / DONE_FILE).is_file():
            rounds.append((int(suffix), folder))
    return sorted(rounds)


def _control(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(metrics, manifest) of a round's completed control, or None."""
    control = folder / CONTROL_DIR
    if not (control / DONE_FILE).is_file():
        return None
    return json.loads((control / METRICS_FILE).read_text()), json.loads((control / MANIFEST_FILE).read_text())


def _difference(a: Any, b: Any) -> float | None:
    return a - b if a is not None and b is not None else None


def round_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One record per completed round: AUCs, change against the previous round, control and gain over it,
    pseudo statistics, time."""
    rows: list[dict[str, Any]] = []
    for idx, folder in completed_rounds(run_dir):
        metrics = json.loads((folder / METRICS_FILE).read_text())
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        pseudo = metrics.get("pseudo") or {}
        control = _control(folder)
        row = {"round": idx, "seconds": manifest.get("seconds"), "external_clips": metrics.get("external_clips"),
               "checks": round_checks(metrics), "selection": selection_score(metrics),
               "control_checks": round_checks(control[0]) if control else None,
               "pseudo_chunks": pseudo.get("chunks"),
               "coverage_above_0.5": pseudo.get("coverage_above_0.5"), "mean_max_prob": pseudo.get("mean_max_prob"),
               "control_seconds": control[1].get("seconds") if control else None}
        for key in AUC_KEYS:
            value = metrics.get(key)
            row[key] = value
            previous = rows[-1].get(key) if rows and rows[-1]["round"] == idx - 1 else None
            row[f"{key}_change"] = _difference(value, previous)
            row[f"control_{key}"] = control[0].get(key) if control else None
            row[f"gain_vs_control_{key}"] = _difference(value, row[f"control_{key}"])
        rows.append(row)
    return rows


def run_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run folder's metrics.json: per round, the student's (or teacher's) and its control's AUCs and the gain."""
    rounds = []
    # val_mixed_auc only where some round has it (runs made before it keep their summary as it was).
    keys = [key for key in AUC_KEYS
            if key != "val_mixed_auc" or any(r[key] is not None or r[f"control_{key}"] is not None for r in rows)]
    for r in rows:
        entry = {"round": r["round"], "arm": "teacher" if r["round"] == 0 else "student", "seconds": r["seconds"],
                 "external_clips": r["external_clips"], **{key: r[key] for key in keys},
                 "checks": r["checks"].as_record()}
        if r["round"] > 0:
            entry["control"] = ({key: r[f"control_{key}"] for key in keys} | {"seconds": r["control_seconds"]}
                                if r["control_seconds"] is not None else None)
            entry["gain_vs_control"] = {key: r[f"gain_vs_control_{key}"] for key in keys}
        rounds.append(entry)
    return {"rounds": rounds}


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def best_round(rows: list[dict[str, Any]]) -> tuple[int, str, float] | None:
    """(round, metric, score) of the round whose kept model scores highest by the metric every round was
    kept by; None when rounds were kept by different metrics or have no selection score."""
    scored = [(r["round"], *r["selection"]) for r in rows]
    metrics = {key for _, key, _ in scored}
    if not scored or len(metrics) != 1 or None in metrics or any(v is None for _, _, v in scored):
        return None
    return max(scored, key=lambda item: (item[2], -item[0]))


def check_lines(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(report.md's first lines, its Checks section): which rounds are not usable and why, and the notes."""
    unusable = [r["round"] for r in rows if not r["checks"].usable]
    head = []
    if rows and rows[-1]["round"] in unusable:
        head.append(f"**Round {rows[-1]['round']} is not usable** ({rows[-1]['checks'].problems[0]}); "
                    "see Checks below. `birdrounds export` refuses it unless `export.force=true`.")
    elif unusable:
        head.append(f"**Not usable: round {', '.join(map(str, unusable))}**; see Checks below.")
    best = best_round(rows)
    if best is not None and rows and best[0] != rows[-1]["round"]:
        head.append(f"**Round {best[0]} scores best** ({best[1]} {best[2]:.3f}), not the last round "
                    f"{rows[-1]['round']}: `birdrounds export` takes round {best[0]} unless `export.round` says otherwise.")
    section = []
    for r in rows:
        for arm, checks in (("", r["checks"]), (" control", r["control_checks"])):
            if checks is None:
                continue
            section += [f"- round {r['round']}{arm}: not usable: {p}" for p in checks.problems]
            section += [f"- round {r['round']}{arm}: {n}" for n in checks.notes]
    if section:
        section = ["## Checks", "", *section, ""]
    return head + ([""] if head else []), section


def render_markdown(rows: list[dict[str, Any]], run_dir: Path) -> str:
    """The report.md text for `rows` (see `round_rows`)."""
    head, checks = check_lines(rows)
    lines = [
        *head,
        f"# Rounds report: {run_dir.name}",
        "",
        ("Round 0 is the teacher trained on labeled clips; round k >= 1 is a student trained on labeled data "
         "plus the round k-1 model's pseudo-labels. Change = against the previous round. Control = the round's "
         "equal-compute control (`control=true`): the same rounds on labeled data only, from the same initial "
         "weights (round 1: the teacher's; round k: round k-1's control), with the same schedule and seed; "
         "gain = student - control: what the pseudo-labels bought, without the extra training. "
         "val_mixed_auc: the held-out clips' calls mixed into quiet train-soundscape segments, scored as 5-s rows "
         "by what the calls changed (the probabilities minus those on the segment alone, the default; `data.mixed_val`; "
         "the soundscape-like score where no labeled soundscapes exist). "
         "External clips: Xeno-canto rows (`data.external`) in the round's training set. "
         "Pseudo columns describe the labels the round's student was trained on."),
        "",
        ("| round | external clips | val_soundscape_auc | change | control | gain vs control | val_clip_auc | change | control "
         "| gain vs control | val_mixed_auc | change | control | gain vs control "
         "| pseudo chunks | coverage > 0.5 | mean max prob | time (s), student + control |"),
        "|" + " --- |" * 18,
    ]
    for r in rows:
        cells = [str(r["round"]), _fmt(r["external_clips"])]
        for key in AUC_KEYS:
            cells += [_fmt(r[key]), _fmt(r[f"{key}_change"], signed=True), _fmt(r[f"control_{key}"]),
                      _fmt(r[f"gain_vs_control_{key}"], signed=True)]
        seconds = _fmt(r["seconds"], 0) + (f" + {_fmt(r['control_seconds'], 0)}" if r["control_seconds"] is not None else "")
        cells += [_fmt(r["pseudo_chunks"]), _fmt(r["coverage_above_0.5"], 2), _fmt(r["mean_max_prob"], 3), seconds]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![AUC by round and pseudo-label confidence]({REPORT_PLOT_FILE})", ""]
    lines += checks
    lines += _predict_section(run_dir)
    return "\n".join(lines)


def _predict_section(run_dir: Path) -> list[str]:
    """The last `birdrounds predict` run (predict.json): where, how fast, AUC with and without post-processing."""
    path = run_dir / PREDICT_RECORD
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    settings = record.get("settings", {})
    lines = ["## Last submission (`birdrounds predict`)", "",
             f"{record['files']} files, {record['chunks']} chunks, {len(record['unreadable'])} unreadable, "
             f"{record['chunks_per_s']} chunks/s; models {', '.join(record['models'])}; written to {record['output']}.", ""]
    if "auc_raw" in record:
        lines += ["| scored against | AUC, raw | AUC, smoothed + file-scaled | smoothing kernel | file_scale_alpha |",
                  "| --- | --- | --- | --- | --- |",
                  f"| {record['solution']} | {_fmt(record['auc_raw'], 4)} | {_fmt(record['auc_postprocessed'], 4)} "
                  f"| {settings.get('smoothing')} | {settings.get('file_scale_alpha')} |", ""]
    return lines


def _pseudo_max_probs(folder: Path) -> np.ndarray | None:
    """Each pseudo-labeled chunk's max class probability in a round folder, or None without labels."""
    path = folder / PSEUDO_FILE
    if not path.is_file():
        return None
    from birdrounds.pseudo import read_pseudo_labels, split_table

    table, provenance = read_pseudo_labels(path)
    _, probs = split_table(table, provenance["classes"])
    return probs.max(axis=1) if probs.size else np.zeros(0, dtype=np.float32)


def render_plot(rows: list[dict[str, Any]], run_dir: Path) -> bytes:
    """PNG bytes: AUC by round (left) and histograms of pseudo-label max probability per round (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = [r["round"] for r in rows]
    for key, marker in zip(AUC_KEYS, ("o", "s", "^")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        if key == "val_mixed_auc" and all(r[key] is None for r in rows):
            continue  # a run made before it existed
        (line,) = left.plot(rounds, values, marker=marker, label=key)
        # The controls continue the teacher on labeled data alone: teacher -> control 1 -> control 2 ...
        chain = [(r["round"], r[key] if r["round"] == 0 else r[f"control_{key}"]) for r in rows]
        chain = [(k, v) for k, v in chain if v is not None]
        if any(k > 0 for k, _ in chain):
            left.plot(*zip(*chain), linestyle="--", marker=marker, markerfacecolor="none", color=line.get_color(),
                      label=f"{key}, control")
    left.set(xlabel="round", ylabel="macro ROC-AUC", title="AUC by round")
    left.set_xticks(rounds)
    left.grid(alpha=0.3)
    left.legend()
    bins = np.linspace(0.0, 1.0, 21)
    plotted = False
    for idx, folder in completed_rounds(run_dir):
        top = _pseudo_max_probs(folder)
        if top is not None and len(top):
            right.hist(top, bins=bins, histtype="step", linewidth=1.5, label=f"round {idx}")
            plotted = True
    right.set(xlabel="max class probability per chunk", ylabel="chunks", title="Pseudo-label confidence")
    if plotted:
        right.legend()
    else:
        right.text(0.5, 0.5, "no pseudo-labels yet", ha="center", va="center", transform=right.transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(run_dir: str | Path) -> Path:
    """(Re)write `report.md`, `report.png` and `metrics.json` in `run_dir` from its completed rounds; returns report.md."""
    run_dir = Path(run_dir)
    rows = round_rows(run_dir)
    write_json_atomic(run_dir / SUMMARY_FILE, run_summary(rows))
    with atomic_open(run_dir / REPORT_PLOT_FILE, "wb") as f:
        f.write(render_plot(rows, run_dir))
    path = run_dir / REPORT_FILE
    with atomic_open(path, "w") as f:
        f.write(render_markdown(rows, run_dir))
    return path
