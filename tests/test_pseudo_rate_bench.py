"""bench/pseudo_rate.py on the smoke data: the figures it prints are the --json file and the --record."""

import json

from conftest import results_page, run_bench, tiny_checkpoint


def test_pseudo_rate_prints_writes_and_records_the_same_figures(smoke_data, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "rate.json"
    # The shared smoke data and cache, only read.
    proc, record = run_bench("pseudo_rate", str(checkpoint), "--repeats", "1", "--device", "cpu", "--batch-size", "8",
                             "--json", str(out), "experiment=smoke", tmp_path=tmp_path, BIRDROUNDS_HOME=str(smoke_data))
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["windows"] > 0 and printed["windows_per_s"] > 0 and printed["device"] == "cpu"
    assert record["overrides"] == ["experiment=smoke"] and record["results"] == printed
    page = results_page(tmp_path / "records")
    assert f"- windows: {printed['windows']}" in page
