"""bench/data_pipeline.py at tiny size: the table it prints, and the same figures in its --record."""

from conftest import results_page, run_bench


def test_record_holds_the_printed_table(tmp_path):
    proc, record = run_bench("data_pipeline", "--n-files", "3", "--file-s", "6", "--num-workers", "0", "--repeats", "1",
                             "--loader-batches", "1", "--min-speedup", "0", "--cache-dir", str(tmp_path / "cache"),
                             tmp_path=tmp_path)
    result = record["results"]
    # Every printed row, formatted as print_table formats it from the record's unrounded figures.
    expected = [f"{r['measurement']:<46} {r['files']:>6} {r['audio_s']:>9.1f} {r['wall_s']:>8.3f} "
                f"{r['x_realtime']:>11.0f} {r['files_per_s']:>9.0f}" for r in result["rows"]]
    assert [r["measurement"] for r in result["rows"]][:2] == ["ogg decode (load_audio), full file",
                                                              "cache build, 0 workers (decode+store)"]
    assert len(expected) == 8 and all(line in proc.stdout.splitlines() for line in expected)
    decode = result["rows"][0]
    for s in result["speedups_over_decode"]:
        row = next(r for r in result["rows"] if r["measurement"] == s["measurement"])
        assert abs(s["speedup"] - row["files_per_s"] / decode["files_per_s"]) < 1e-9
        assert s["gated"] == s["measurement"].endswith("warm")
        assert f"speed-up over ogg decode, {s['measurement']}: {s['speedup']:.1f}x" in proc.stdout
    assert len(result["speedups_over_decode"]) == 4
    assert result["goal_met"] is True and f"PASS: {result['goal']}" in proc.stdout  # --min-speedup 0: always met
    # On the results page: the table.
    page = results_page(tmp_path / "records")
    assert "| measurement | files | audio_s | wall_s | x_realtime | files_per_s |" in page
    assert "| ogg decode (load_audio), full file | 3 | 18 |" in page
