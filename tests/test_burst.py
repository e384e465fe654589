"""A burst of films through the whole pipeline with one kill -9 of the worker: every study
gets exactly one AI report in the EHR (the full 1,000-study run is `bench/burst.py`)."""

from __future__ import annotations

from pathlib import Path

from bench.burst import run_burst


def test_a_burst_with_a_killed_worker_files_each_study_exactly_once(tmp_path: Path) -> None:
    burst = run_burst(tmp_path, 24, kill_after=6, batch_size=4, lease_s=15.0, timeout_s=120.0)
    assert burst.killed_at_reports is not None  # the worker really died mid-run
    assert burst.missing == 0, f"{burst.missing} studies never got a report"
    assert burst.duplicates == 0, f"{burst.duplicates} studies got two reports"
    assert burst.reports == 24
    assert len(burst.latencies_s) == 24  # one finished job per study
