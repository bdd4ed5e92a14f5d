"""instdisc/plots/metrics.py: reading metrics.jsonl, and its errors."""
import pytest

from instdisc.errors import InstdiscError
from instdisc.plots.metrics import metrics_path, read_metrics

from _plot_helpers import fake_records, write_metrics


def test_reads_a_run_folder_or_the_file(tmp_path):
    recs = fake_records()
    run = write_metrics(tmp_path / "r", recs)
    assert read_metrics(run) == recs
    assert read_metrics(run / "metrics.jsonl") == recs
    assert metrics_path(run) == run / "metrics.jsonl"


def test_old_files_with_bare_nan_are_read(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"type": "step", "global_step": 1, "log_z": NaN}\n')
    rec, = read_metrics(tmp_path)
    assert rec["log_z"] != rec["log_z"]  # NaN


def test_damaged_last_line_is_skipped_but_not_others(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"type": "step", "global_step": 1}\n\n{"type": "ste')
    assert read_metrics(tmp_path) == [{"type": "step", "global_step": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"type": "ste\n{"type": "step", "global_step": 1}\n')
    with pytest.raises(InstdiscError, match="line 1 is not a JSON object"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('[1, 2]\n')
    with pytest.raises(InstdiscError, match="line 1 is not a JSON object"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "nope", "run not found"),
    (lambda p: p, "has no metrics.jsonl"),
    (lambda p: (p / "metrics.jsonl").write_text("\n") and p, "is empty"),
])
def test_errors_name_the_problem(tmp_path, make, match):
    with pytest.raises(InstdiscError, match=match):
        read_metrics(make(tmp_path))
