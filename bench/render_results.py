"""Render docs/results.md from the benchmark records in results/*.json (`make results`).

Every number on that page comes from a record (bench/records.py writes them; the older ones were
transcribed from the project's notes and say so). The page is never edited by hand: change or add a
record, then run this. `--check` exits 1 when the committed page differs from what the records give.

Records with a template of their own (rounds_gain, inference, external_teachers, the transcribed "table"
records and mixed_val_corr's transcribed summary) render through it; what the other benchmarks write with
`--record` (GENERIC, mixed_val_corr's own records included) renders as it is: numbers and text as a list,
rows as a table, the rest as a JSON block. A record of any other benchmark is listed by name.

    python bench/render_results.py [--results results] [--out docs/results.md] [--check]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
PAGE = REPO / "docs" / "results.md"

# Page sections in order, with their headings; a record names its section, or gets its benchmark's.
SECTIONS = {
    "headline": "The default recipe: students against equal-compute controls and the oracle",
    "presets": "Presets on their own data: students against equal-compute controls and the teacher",
    "real_audio": "Real sound: pretrained external teachers on a real-call set that is not distributed",
    "rounds": "Other rounds benchmarks",
    "inference": "Inference speed",
    "mixed_val": "Validation without labeled soundscapes: does val_mixed_auc rank models?",
    "ablation": "What each self-training lever did",
    "other": "Other records",
}
DEFAULT_SECTION = {"rounds_gain": "headline", "inference": "inference", "mixed_val_corr": "mixed_val",
                   "external_teachers": "real_audio",
                   "ablation": "ablation"}
# Benchmarks whose `--record` results render as they are (render_generic); any other benchmark without a
# template is listed by its record's name only.
GENERIC = {"data_pipeline", "loader_rate", "mixed_val_corr", "pseudo_rate", "scale", "snr_tiers", "train_throughput",
           "wide_val", "xc_archive_gain"}

INTRO = """\
# Results

Rendered by `make results` (`bench/render_results.py`) from the records in [`results/`](../results/);
do not edit this page by hand. A record is one JSON file per benchmark result: the command and
overrides, the code version, the machine, the date and the figures, per seed where there are seeds.
Every benchmark that prints a figure writes new ones with `--record` (`python bench/<name>.py ... --record`).

Records whose source says "transcribed" were copied from the project's earlier notes (all measured on
a 2-core CPU machine without a GPU): they carry no code version or CPU model, and those marked "no" under
"one command" were made with copied run folders, re-stamped config hashes or scripts that are not in the
repository, so they cannot be rerun as written. They predate epoch selection (`train.select_by`): each
model in them is its fit's last epoch. Validation-soundscape AUC is the Kaggle macro
ROC-AUC on the synthetic data's labeled validation soundscapes: 120 is the reference; 40 and 10 are
noisier, so compare a row only with its own baseline. Since each round keeps the epoch its validation
prefers, the rounds benchmark scores on the 120-soundscape set minus the data's own 10 (the ones that chose
the epoch): "110 validation soundscapes" below.
"""


def load_records(folder: Path = RESULTS) -> list[tuple[str, dict[str, Any]]]:
    """(file name, record) for every results/*.json, in name order."""
    return [(path.name, json.loads(path.read_text(encoding="utf-8"))) for path in sorted(folder.glob("*.json"))]


def section_of(record: dict[str, Any]) -> str:
    """The page section a record belongs to; a tagged rounds_gain run is not the headline."""
    if record.get("section"):
        return record["section"]
    if record["benchmark"] == "rounds_gain" and record["results"].get("tag"):
        return "rounds"
    return DEFAULT_SECTION.get(record["benchmark"], "other")


def cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, nothing as an en dash."""
    return "–" if text is None or text == "" else str(text).replace("|", "\\|")


def stat(s: dict[str, Any] | None, signed: bool = False) -> str:
    """mean ± std (3 decimals), the mean alone without a spread, or the per-seed values without a mean."""
    if not s:
        return "–"
    num = "{:+.3f}" if signed else "{:.3f}"
    if s.get("mean") is None:
        return " / ".join(num.format(v) for v in s.get("per_seed") or []) or "–"
    text = num.format(s["mean"])
    return f"{text} ± {s['std']:.3f}" if s.get("std") is not None else text


def per_seed(s: dict[str, Any] | None) -> str:
    return ", ".join(f"{v:+.3f}" for v in s["per_seed"]) if s and s.get("per_seed") else "–"


def provenance(name: str, record: dict[str, Any]) -> str:
    """One line: when, how scored, which record."""
    when = f"Measured {record['measured']}" if record.get("measured") else "Date not recorded"
    return f"{when}; record [`{name}`](../results/{name})."


def render_rounds(name: str, record: dict[str, Any]) -> list[str]:
    r = record["results"]
    scored = r.get("scored_on_val_soundscapes")
    seeds = ", ".join(map(str, r.get("seeds", [])))
    where = f"{scored} validation soundscapes" if scored else "the run's own validation soundscapes"
    lines = [f"### {record.get('title') or name}", "",
             f"{provenance(name, record)} `{r.get('metric', 'val_soundscape_auc')}` on {where}, seeds {seeds}"
             + (f"; overrides `{' '.join(record['overrides'])}`" if record.get("overrides") else "") + ".", "",
             "| round | control | student | oracle | gain (student − control) | headroom (oracle − control) | gain by seed "
             "| student − teacher |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in r["rounds"]:
        lines.append(f"| {k['round']} | {stat(k['control'])} | {stat(k['student'])} | {stat(k['oracle'])} | "
                     f"**{stat(k['gain'], True)}** | {stat(k['headroom'], True)} | {per_seed(k['gain'])} | "
                     f"{stat(k.get('over_teacher'), True)} |")
    if r.get("teacher"):
        lines += ["", f"Teachers (round 0): {stat(r['teacher'])}."]
    if r.get("goals"):
        lines += ["", "Goals of `bench/rounds_gain.py`:", ""]
        lines += [f"- {'MET' if g['met'] else 'NOT MET'}: {g['goal']}" for g in r["goals"]]
    return lines + [""]


def render_inference(name: str, record: dict[str, Any]) -> list[str]:
    r = record["results"]
    lines = [f"### {record.get('title') or name}", "", f"{provenance(name, record)} Baseline: {r['baseline']}.", "",
             "| path | 5-s chunks/s, median (range) | x torch eager | max abs diff vs torch eager |",
             "| --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(f"| {cell(row['path'])} | {row['chunks_per_s']:.1f} ({row['min_chunks_per_s']:.0f}-"
                     f"{row['max_chunks_per_s']:.0f}) | {row['x_torch_eager']:.2f}x | {row['max_abs_diff_vs_torch']:.1e} |")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_ms_per_chunk"].items())
    lines += ["", f"Stages of the fast path on one thread, ms per 5-s chunk: {stages}; spread over {r['threads']} "
                  f"cores with no waiting that is a ceiling of {r['ceiling_chunks_per_s']:.0f} chunks/s, and the fast "
                  f"path reaches {r['fast_path_share_of_ceiling']:.0%} of it. Goal {r['goal']}: "
                  f"{'MET' if r['goal_met'] else 'NOT MET'}."]
    if r.get("auc"):
        lines += ["", "| variant (a trained model, its validation soundscapes) | AUC | change |", "| --- | --- | --- |"]
        lines += [f"| {a['variant']} | {a['auc_raw']:.4f} | {a['auc_change']:+.4f} |" for a in r["auc"]]
    return lines + [""]


def render_mixed_val(name: str, record: dict[str, Any]) -> list[str]:
    r = record["results"]
    n, m = r["models"]["all"], r["models"]["without_oracle_students"]
    ceiling = r["reference_ceiling"]
    lines = [f"### {record.get('title') or name}", "",
             f"{provenance(name, record)} Spearman rank correlation with {r['reference']} (its own split-half "
             f"reliability {ceiling['spearman_brown']:.2f}: at most about {ceiling['attainable_rho']:.2f} is "
             f"attainable); target {r['target_rho']}.", "",
             f"| score | all {n} models | without the oracle students ({m}) |", "| --- | --- | --- |"]
    for row in r["rows"]:
        mark = "**" if row.get("default") else ""
        lines.append(f"| {cell(row['score'])} | {mark}{row['all']['rho']:.3f}{mark} (p {row['all']['p']:.2g}) | "
                     f"{mark}{row['without_oracle_students']['rho']:.3f}{mark} (p {row['without_oracle_students']['p']:.2g}) |")
    return lines + [""]


def described(record: dict[str, Any]) -> list[str]:
    """The record's data set and its note on how the runs were made, a paragraph each, where it has them."""
    return [line for key, label in (("data", "Data"), ("note", "How the runs were made")) if record.get(key)
            for line in (f"{label}: {str(record[key]).rstrip('.')}.", "")]


def render_tables(name: str, record: dict[str, Any]) -> list[str]:
    """A record of plain tables (cells as text), each under its caption, after its data set and note if any."""
    lines = [f"### {record.get('title') or name}", "", provenance(name, record), "", *described(record)]
    for table in record["results"]["tables"]:
        lines += [table["caption"] + ":", "", "| " + " | ".join(map(cell, table["columns"])) + " |",
                  "| " + " | ".join("---" for _ in table["columns"]) + " |"]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table["rows"]]
        lines.append("")
    return lines


def number(value: Any) -> str:
    """A figure as a generic table shows it: about 4 significant digits, thousands grouped, JSON for the rest."""
    if value is None or isinstance(value, (bool, str, int)):
        return cell(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    if isinstance(value, list) and plain(value):
        return ", ".join(number(v) for v in value) or "–"
    return cell(json.dumps(value, separators=(", ", ": ")))


def plain(value: Any) -> bool:
    """A number, text, nothing, or a list of those: one line of a generic rendering."""
    simple = (bool, str, int, float)
    return value is None or isinstance(value, simple) or (
        isinstance(value, list) and all(v is None or isinstance(v, simple) for v in value))


def render_generic(name: str, record: dict[str, Any]) -> list[str]:
    """Any benchmark's results as they are: its numbers, texts and lists of them as a list, each list of rows
    (dicts) as a table with the union of their keys as columns, anything else as a JSON block; each under its key."""
    r = record["results"]
    overrides = f" Overrides `{' '.join(record['overrides'])}`." if record.get("overrides") else ""
    lines = [f"### {record.get('title') or name}", "", provenance(name, record) + overrides, "", *described(record)]
    scalars = {k: v for k, v in r.items() if plain(v)}
    if scalars:
        lines += [f"- {k}: {number(v)}" for k, v in scalars.items()] + [""]
    for key, value in r.items():
        if key in scalars:
            continue
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            columns = list(dict.fromkeys(k for row in value for k in row))
            lines += [f"{key}:", "", "| " + " | ".join(map(cell, columns)) + " |",
                      "| " + " | ".join("---" for _ in columns) + " |"]
            lines += ["| " + " | ".join(number(row.get(c)) for c in columns) + " |" for row in value]
            lines.append("")
        else:
            lines += [f"{key}:", "", "```json", json.dumps(value, indent=1), "```", ""]
    return lines


def renderer(record: dict[str, Any]):
    """The function that renders a record's section, or None (listed by name only)."""
    benchmark = record["benchmark"]
    if benchmark == "mixed_val_corr" and "reference_ceiling" in record["results"]:
        return render_mixed_val  # the transcribed summary; the script's own --record is generic
    own = {"rounds_gain": render_rounds, "inference": render_inference, "table": render_tables,
           "external_teachers": render_tables}.get(benchmark)
    return own or (render_generic if benchmark in GENERIC else None)


def lever_gain(part: dict[str, Any] | None, r: dict[str, Any], which: str) -> str:
    """A lever's gain cell: round 1, and round 2 where it was measured."""
    if part is None or part.get("gain") is None:
        return "–"
    text = stat(part["gain"], True)
    if r.get("round_2"):
        text += f"; round 2 {stat(r['round_2'][which]['gain'], True)}"
    return text


def render_ablation(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["Round 1 unless a cell says round 2; gain = student − control, mean ± std over the seeds listed.", "",
             "| lever | setting | seeds | scored on | gain without it | gain with it | kept | record |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, record in records:
        r = record["results"]
        with_it = r.get("effect_note") or lever_gain(r["with"], r, "with")
        lines.append(f"| {cell(r['lever'])} | {cell(r['setting'])} | {', '.join(map(str, r['seeds']))} | "
                     f"{cell(r.get('scored_on_val_soundscapes'))} | {lever_gain(r['baseline'], r, 'baseline')} | "
                     f"{cell(with_it)} | {cell(r['kept'])} | [{name.removesuffix('.json')}](../results/{name}) |")
    return lines + [""]


def short_sha(sha: str | None) -> str | None:
    """The first 12 hex digits, keeping the "-dirty" mark of a run from uncommitted code."""
    return sha and sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")


def shown_command(command: str) -> str:
    """A record's command as the page shows it: the scratch folder it used (`--home /tmp/x`,
    `BIRDROUNDS_HOME=/tmp/x`) as DIR, the folder you would choose."""
    return re.sub(r"/tmp/[\w.-]+", "DIR", command)


def render_index(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["## Every record", "",
             "| record | measured | code version | machine | one command? | command | source |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, record in sorted(records):
        m = record.get("machine") or {}
        machine = m.get("cpu_model") and f"{m['cpu_model']}, {m.get('cpu_count')} cores" or m.get("description")
        again = "yes" if record.get("reproducible_by_one_command") else f"no: {record.get('not_reproducible_because', '')}"
        lines.append(f"| [{name.removesuffix('.json')}](../results/{name}) | {cell(record.get('measured'))} | "
                     f"{cell(short_sha(record.get('git_sha')))} | {cell(machine)} | {cell(again)} | "
                     f"{'`' + cell(shown_command(record['command'])) + '`' if record.get('command') else 'not recorded'} | "
                     f"{cell(record.get('source'))} |")
    return lines + [""]


def render(records: list[tuple[str, dict[str, Any]]]) -> str:
    """The whole page, from (file name, record) pairs."""
    ordered = sorted(records, key=lambda nr: (nr[1].get("order", 0), nr[1].get("measured") or "", nr[0]))
    lines = [INTRO]
    for section, heading in SECTIONS.items():
        members = [(n, r) for n, r in ordered if section_of(r) == section]
        if not members:
            continue
        lines += [f"## {heading}", ""]
        if section == "ablation":
            lines += render_ablation(members)
            continue
        if section == "headline":  # the newest headline measurement stands; the older ones follow it, marked
            members = sorted(members, key=lambda nr: nr[1].get("measured") or "", reverse=True)
            members = [(n, {**r, "title": f"{'Current' if i == 0 else 'Superseded'}: {r.get('title') or n}"})
                       for i, (n, r) in enumerate(members)]
        for name, record in members:
            render_one = renderer(record)
            lines += render_one(name, record) if render_one else [f"- [`{name}`](../results/{name})", ""]
    lines += render_index(ordered)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of *.json records")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from the records")
    args = parser.parse_args()
    page = render(load_records(args.results))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != page:
            print(f"{args.out} is out of date with {args.results}: run `make results`", file=sys.stderr)
            return 1
        return 0
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(args.out)  # atomic: a reader never sees half a page
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
