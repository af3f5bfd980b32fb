"""The contention scenarios' code at a small size (the real figures come from `scripts/bench.sh`; the whole
benchmark's own small end-to-end run is `python -m bench.run --sizes 3000`, which measures and so lives in bench/,
outside the test command's time budget)."""

from __future__ import annotations

from bench import contention
from bench.run import Bench
from devkit.pg import PgServer


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
