"""A small smoke run of the benchmark code (the real figures come from `scripts/bench.sh`)."""

from __future__ import annotations

from bench import contention
from bench.run import Bench, markdown, run
from devkit.pg import PgServer


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


def test_the_contention_scenarios_measure_the_current_version(pg_server: PgServer, tmp_path) -> None:
    bench = Bench(pg_server, tmp_path)
    current = {contention.CURRENT: contention.REPO / "plugins"}
    hot = contention.hot_lock(bench, current, 0.9, 3000)[contention.CURRENT]
    assert hot["landed"] and hot["task_attempts"] == 1 and hot["app_failed"] == 0
    memory = contention.memory(bench, current, 2000)[contention.CURRENT]
    assert memory["nulled"] >= 2000 and memory["peak_rss_mib"] > 0
    bench.drop_templates()
    text = "\n".join(contention.markdown({"hot_lock": {"0.90": {"x": hot}}, "memory": {"2000": {"x": memory}}}))
    assert "hot row lock" in text and "Worker memory" in text
