"""The run folder's report: `report.md` (one row per completed round) and `report.png`.

Built from the round records alone (`round_k/metrics.json`, `manifest.json`, `pseudo_labels.parquet`),
so it can be rewritten at any time, e.g. after each round or by hand on a copied run folder.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from birdrounds.artifacts import atomic_open

log = logging.getLogger(__name__)

AUC_KEYS = ("val_soundscape_auc", "val_clip_auc")


def completed_rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """(round index, folder) of every completed round (a DONE marker), in order; set-aside folders skipped."""
    rounds = []
    for folder in run_dir.glob("round_*"):
        suffix = folder.name.removeprefix("round_")
        if suffix.isdigit() and (folder / "DONE").is_file():
            rounds.append((int(suffix), folder))
    return sorted(rounds)


def round_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One record per completed round: AUCs, change against the previous round, pseudo statistics, time."""
    rows: list[dict[str, Any]] = []
    for idx, folder in completed_rounds(run_dir):
        metrics = json.loads((folder / "metrics.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
        pseudo = metrics.get("pseudo") or {}
        row = {"round": idx, "seconds": manifest.get("seconds"), "pseudo_chunks": pseudo.get("chunks"),
               "coverage_above_0.5": pseudo.get("coverage_above_0.5"), "mean_max_prob": pseudo.get("mean_max_prob")}
        for key in AUC_KEYS:
            value = metrics.get(key)
            row[key] = value
            previous = rows[-1].get(key) if rows and rows[-1]["round"] == idx - 1 else None
            row[f"{key}_change"] = value - previous if value is not None and previous is not None else None
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def render_markdown(rows: list[dict[str, Any]], run_dir: Path) -> str:
    """The report.md text for `rows` (see `round_rows`)."""
    lines = [
        f"# Rounds report: {run_dir.name}",
        "",
        ("Round 0 is the teacher trained on labeled clips; round k >= 1 is a student trained on labeled data "
         "plus the round k-1 model's pseudo-labels. Change = against the previous round. "
         "Pseudo columns describe the labels the round's student was trained on."),
        "",
        ("| round | val_soundscape_auc | change | val_clip_auc | change | pseudo chunks | coverage > 0.5 "
         "| mean max prob | time (s) |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {_fmt(r['val_soundscape_auc'])} | {_fmt(r['val_soundscape_auc_change'], signed=True)} "
            f"| {_fmt(r['val_clip_auc'])} | {_fmt(r['val_clip_auc_change'], signed=True)} | {_fmt(r['pseudo_chunks'])} "
            f"| {_fmt(r['coverage_above_0.5'], 2)} | {_fmt(r['mean_max_prob'], 3)} | {_fmt(r['seconds'], 0)} |")
    lines += ["", "![AUC by round and pseudo-label confidence](report.png)", ""]
    lines += _predict_section(run_dir)
    return "\n".join(lines)


def _predict_section(run_dir: Path) -> list[str]:
    """The last `birdrounds predict` run (predict.json): where, how fast, AUC with and without post-processing."""
    path = run_dir / "predict.json"
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
    path = folder / "pseudo_labels.parquet"
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
    for key, marker in zip(AUC_KEYS, ("o", "s")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        left.plot(rounds, values, marker=marker, label=key)
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
    """(Re)write `report.md` and `report.png` in `run_dir` from its completed rounds; returns report.md."""
    run_dir = Path(run_dir)
    rows = round_rows(run_dir)
    with atomic_open(run_dir / "report.png", "wb") as f:
        f.write(render_plot(rows, run_dir))
    path = run_dir / "report.md"
    with atomic_open(path, "w") as f:
        f.write(render_markdown(rows, run_dir))
    return path
