"""bench/train_throughput.py at tiny size: what it prints per epoch, and the same figures in its --record."""

from conftest import results_page, run_bench


def test_record_holds_the_printed_epochs(tmp_path):
    proc, record = run_bench("train_throughput", "--model", "tiny", "--steps", "1", "--epochs", "1", "--files", "4",
                             "--num-workers", "0", "--batch-size", "2", "--work-dir", str(tmp_path / "work"),
                             "data.mixup.prob=0", tmp_path=tmp_path)
    assert record["overrides"] == ["data.mixup.prob=0"]
    result = record["results"]
    assert (result["model"], result["batch_size"], result["num_workers"], result["mixup_p"]) == ("tiny", 2, 0, 0.0)
    assert f"MixUp p={result['mixup_p']}, " in proc.stdout  # the override reached the run, as printed
    assert [e["epoch"] for e in result["epochs"]] == [0]
    for e in result["epochs"]:
        assert e["samples_per_s"] > 0 and 0 <= e["data_wait_share"] <= 1
        assert (f"epoch {e['epoch']}: {e['samples_per_s']:.1f} samples/s, waiting for data "
                f"{100 * e['data_wait_share']:.1f}% of epoch time") in proc.stdout
    last = result["epochs"][-1]["data_wait_share"]
    assert result["verdict"] == ("OK" if last < result["data_wait_share_limit"] else "DATA-BOUND")
    assert f"{result['verdict']}: data wait {100 * last:.1f}%" in proc.stdout
    # On the results page: the epochs as a table.
    page = results_page(tmp_path / "records")
    assert "| epoch | samples_per_s | data_wait_share |" in page and "- verdict: " in page
