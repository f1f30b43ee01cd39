"""results/*.json -> docs/results.md: the page is exactly what its records render to, and benchmarks write records."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a reader needs to trust or redo a result, in every record.
PROVENANCE = ("name", "benchmark", "measured", "git_sha", "machine", "command", "overrides", "source",
              "reproducible_by_one_command", "results")


def bench_module(name: str):
    """A script of bench/ as a module (its scripts run as `python bench/<name>.py` and import records.py and each
    other by name, from their own folder: so does this)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_results_page_is_rendered_from_the_records():
    render = bench_module("render_results")
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    assert render.render(render.load_records(REPO / "results")) == page, \
        "docs/results.md differs from what results/*.json render to: run `make results`"


def test_every_record_states_its_provenance():
    records = sorted((REPO / "results").glob("*.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in PROVENANCE if key not in record]
        assert not missing, f"{path.name} lacks {missing}"
        assert record["machine"].get("cpu_count"), f"{path.name}: machine without a core count"
        if not record["reproducible_by_one_command"]:
            assert record.get("not_reproducible_because"), f"{path.name}: say why it cannot be rerun as written"


def test_check_mode_flags_a_stale_page(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("stale\n")
    script = [sys.executable, str(REPO / "bench" / "render_results.py"), "--out", str(page)]
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 1
    assert subprocess.run(script, capture_output=True).returncode == 0
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0


def write_arm(folder: Path, soundscape_auc: float, clip_auc: float, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"val_soundscape_auc": soundscape_auc, "val_clip_auc": clip_auc}))
    (folder / "manifest.json").write_text(json.dumps({"seconds": seconds}))


def test_rounds_gain_writes_a_record_and_prints_the_same(tmp_path):
    for seed, base in ((0, 0.70), (1, 0.71)):
        main, oracle = tmp_path / "runs" / f"seed{seed}", tmp_path / "runs" / f"seed{seed}_oracle"
        write_arm(main / "round_0", base - 0.05, 0.90, 100)
        write_arm(main / "round_1", base + 0.03, 0.90, 10)
        write_arm(main / "round_1" / "control", base, 0.905, 11)
        write_arm(oracle / "round_1", base + 0.06, 0.90, 12)
    out = tmp_path / "records"
    command = [sys.executable, str(REPO / "bench" / "rounds_gain.py"), "--home", str(tmp_path), "--report-only",
               "--rounds", "1", "--seeds", "0", "1"]
    env = {**os.environ, "BIRDROUNDS_RESULTS_DIR": str(out)}
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    recorded = subprocess.run([*command, "--record"], capture_output=True, text=True, timeout=120, env=env)
    assert recorded.returncode == plain.returncode == 0, recorded.stdout + recorded.stderr
    assert recorded.stdout == plain.stdout  # the printed report does not change
    [path] = out.glob("rounds-gain-*.json")
    record = json.loads(path.read_text())
    assert all(key in record for key in PROVENANCE)
    assert record["machine"]["cpu_count"] >= 1 and record["command"].startswith("python bench/rounds_gain.py")
    [round_1] = record["results"]["rounds"]
    assert all(abs(g - 0.03) < 1e-9 for g in round_1["gain"]["per_seed"])
    assert abs(round_1["headroom"]["mean"] - 0.06) < 1e-9
    # A bench-written record renders into the page's headline section.
    render = bench_module("render_results")
    page = render.render(render.load_records(out))
    assert "| 1 | 0.705 ± 0.007 | 0.735 ± 0.007 | 0.765 ± 0.007 | **+0.030 ± 0.000** |" in page


def test_readme_results_table_is_the_headline_record():
    # README's one results table copies the current headline record (the default recipe, newest measurement:
    # the one docs/results.md shows first); it must not drift from it.
    render = bench_module("render_results")
    headline = [r for _, r in render.load_records(REPO / "results") if render.section_of(r) == "headline"]
    record = max(headline, key=lambda r: r.get("measured") or "")
    assert record["name"] == "rounds-gain" and record["reproducible_by_one_command"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for k in record["results"]["rounds"]:
        row = (f"| {k['round']} | {render.stat(k['control'])} | {render.stat(k['student'])} | {render.stat(k['oracle'])} | "
               f"{render.stat(k['gain'], True)} | {render.stat(k['headroom'], True)} |")
        assert row in readme, f"README's results table lacks {row}"


# Every benchmark script that prints figures takes --record (bench/records.py); none has a template of its own.
RECORDING = ("data_pipeline", "loader_rate", "mixed_val_corr", "pseudo_rate", "scale", "snr_tiers", "train_throughput",
             "wide_val", "xc_archive_gain")


def test_record_result_names_the_file_after_the_benchmark_and_says_where(tmp_path, monkeypatch, capsys):
    records = bench_module("records")
    monkeypatch.setenv("BIRDROUNDS_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "loader_rate.py"), "--workers", "0",
                                      "data.augment.pitch_p=0"])
    results = {"batch_size": 4, "rows": [{"workers": 0, "samples_per_s": 12.5}]}
    first = records.record_result("loader_rate", results, overrides=["data.augment.pitch_p=0"])
    second = records.record_result("loader_rate", results)
    assert first.parent == second.parent == tmp_path  # never the repository's results/
    assert first.name.startswith("loader-rate-") and second.name == first.name.removesuffix(".json") + "-2.json"
    assert capsys.readouterr().err.splitlines() == [f"record: {first}", f"record: {second}"]
    record = json.loads(first.read_text())
    assert all(key in record for key in PROVENANCE)
    assert (record["benchmark"], record["name"], record["results"]) == ("loader_rate", "loader-rate", results)
    assert record["overrides"] == ["data.augment.pitch_p=0"]
    assert record["command"] == "python bench/loader_rate.py --workers 0 data.augment.pitch_p=0"


def test_a_benchmark_record_without_a_template_renders_its_results(tmp_path):
    records, render = bench_module("records"), bench_module("render_results")
    results = {"batch_size": 4, "goal_met": False, "note": "a | b", "ceiling": None,
               "rows": [{"workers": 0, "samples_per_s": 1234.5678, "all_samples_per_s": [1234.5678, 999.04]},
                        {"workers": 1, "samples_per_s": 0.81234, "first_batch_s": 0.0001234}],
               "per_class": {"0": {"a": 0.5}}, "cuts_db": [0.9, 5.9]}
    for benchmark in RECORDING:
        records.write_record(benchmark, benchmark.replace("_", "-"), results, overrides=["x.y=1"], folder=tmp_path)
    loaded = render.load_records(tmp_path)
    assert len(loaded) == len(RECORDING)
    page = render.render(loaded)
    for benchmark in RECORDING:
        assert page.count(f"### {benchmark.replace('_', '-')}-") == 1, benchmark  # a section, not only a link
    assert page.count("| workers | samples_per_s | all_samples_per_s | first_batch_s |") == len(RECORDING)
    assert page.count("| 0 | 1,235 | 1,235, 999 | – |") == len(RECORDING)  # a missing cell as a dash
    assert page.count("| 1 | 0.8123 | – | 1.23e-04 |") == len(RECORDING)
    assert page.count("- batch_size: 4") == page.count("- goal_met: False") == len(RECORDING)
    assert page.count("- note: a \\| b") == page.count("- ceiling: –") == len(RECORDING)
    assert page.count('"a": 0.5') == len(RECORDING)  # nested results as JSON
    assert page.count("- cuts_db: 0.9, 5.9") == len(RECORDING)  # a list of numbers on one line
    assert page.count("Overrides `x.y=1`.") == len(RECORDING)
    # mixed_val_corr's own record goes to its section; its transcribed summary keeps that template.
    sections = {r["benchmark"]: render.section_of(r) for _, r in loaded}
    assert sections.pop("mixed_val_corr") == "mixed_val" and set(sections.values()) == {"other"}
    records = [r for _, r in render.load_records(REPO / "results") if r["benchmark"] == "mixed_val_corr"]
    transcribed = [r for r in records if r["source"] != "written by the benchmark"]
    assert transcribed and all(render.renderer(r) is render.render_mixed_val for r in transcribed)
    assert all(render.renderer(r) is render.render_generic for r in records if r not in transcribed)
    # A benchmark that is neither: listed by name, as before.
    other = {**loaded[0][1], "benchmark": "something_else"}
    assert render.render([("other.json", other)]).count("- [`other.json`](../results/other.json)") == 1
