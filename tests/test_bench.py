"""A small smoke run of the benchmark code (the real figures come from `python -m bench.run`)."""

from __future__ import annotations

from bench.run import markdown, run


def test_benchmark_runs_end_to_end_on_a_small_table_and_reports_every_section() -> None:
    results = run([3000], not_in_cap=5)
    size = results["sizes"]["3000"]
    for key in ("baseline", "pipeline", "naive", "pipeline_blocked", "naive_blocked"):
        assert size[key]["app"]["count"] > 0
    assert size["pipeline_blocked"]["app"]["failed"] == 0
    assert set(size["floor"]) <= set(size["steps"])
    assert size["not_in"]["orphans"] > 0
    text = markdown(results)
    for heading in ("App impact", "Cost against the floor", "Orphan query", "Airflow overhead"):
        assert heading in text
