"""A fleet target's wait for its turn, run by Airflow's triggerer instead of a rescheduled sensor.

A reschedule-mode sensor is one task run per look, and Airflow can fail it when the executor's event for one look
arrives after the next look was queued (apache/airflow#71172): the more targets wait, the more targets are lost
without ever being touched. A deferred task has no such race (the scheduler knows a resumed deferral), holds no
worker slot, and its looks are made by the triggerer.

The looks of one run are shared: every waiting target of a run asks the same question (which of the fleet's reports
have ended), so the triggerer asks the execution API once per interval and run, however many targets wait (one query
per waiting target, 49 of them every 5 s in the 50-database benchmark, kept the api-server busy on the cores the
scheduler and the task processes needed; issue 20).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from fk_maintenance.airflow.fleet import FLEET_GROUP, TARGET_STARTED_KEY, Turn, reports_from_states, turn
from fk_maintenance.keys.settings import RunSettings
from fk_maintenance.steps.registry import REPORT_TASK

FLEET_REPORT_TASK_ID = f"{FLEET_GROUP}.{REPORT_TASK}"
# The latest look of each run, (dag_id, run_id) -> (monotonic time it began, the look), shared by the run's
# triggers. The triggerer runs them in one event loop, so no lock: a look under way is awaited, not repeated.
_LOOKS: dict[tuple[str, str], tuple[float, asyncio.Future[dict[int, str]]]] = {}
# A run none of whose triggers asked for this long has none waiting (they ask every poke interval): its look goes.
_FORGET_AFTER_S = 3600.0
# Never spin: a look that took longer than the interval is followed by a short pause, not by an immediate one.
_MIN_SLEEP_S = 0.2


class TurnTrigger(BaseTrigger):
    """Ends the waiting task once the target at ``position`` may start (success, stamping the target's start), or
    fires once it must never start (``max_failures`` reached), judged from the states of the fleet's report tasks in
    this run (a report task fails exactly when its target did). When the turn comes the task does not resume on a
    worker: that was one more task process and one more scheduler pass between a target's turn and its first step."""

    def __init__(
        self,
        *,
        dag_id: str,
        run_id: str,
        position: int,
        max_parallel: int,
        max_failures: int,
        poke_seconds: float,
    ) -> None:
        super().__init__()
        self.dag_id = dag_id
        self.run_id = run_id
        self.position = position
        self.max_parallel = max_parallel
        self.max_failures = max_failures
        self.poke_seconds = poke_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "dag_id": self.dag_id,
                "run_id": self.run_id,
                "position": self.position,
                "max_parallel": self.max_parallel,
                "max_failures": self.max_failures,
                "poke_seconds": self.poke_seconds,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        settings = RunSettings(max_parallel=self.max_parallel, max_failures=self.max_failures)
        while True:
            began, states = await self._report_states()
            decision = turn(self.position, reports_from_states(states), settings)
            if decision.decision != "wait":
                self.log.info("turn of #%d: %s (%s)", self.position, decision.decision, decision.reason)
                yield _ending(decision)
                return
            # Wake when the run's next look is due: the run's waiting triggers then ask together and share it,
            # and none sees a look older than one interval.
            await asyncio.sleep(max(_MIN_SLEEP_S, began + self.poke_seconds - time.monotonic()))

    async def _report_states(self) -> tuple[float, dict[int, str]]:
        """When the look began, and the state of each fleet target's report task in this run by map index: the
        run's latest look if it began less than this trigger's interval ago, else a new one that the run's other
        triggers then share. A look that failed is not shared past its own askers: the next one makes a new one."""
        key = (self.dag_id, self.run_id)
        now = time.monotonic()
        latest = _LOOKS.get(key)
        if latest is None or now - latest[0] >= self.poke_seconds or _failed(latest[1]):
            for stale in [k for k, (began, _) in _LOOKS.items() if now - began > _FORGET_AFTER_S]:
                del _LOOKS[stale]
            latest = (now, asyncio.ensure_future(self._look()))
            _LOOKS[key] = latest
        # A trigger cancelled while waiting (its task cleared, the triggerer stopping) leaves the look to the others.
        return latest[0], await asyncio.shield(latest[1])

    async def _look(self) -> dict[int, str]:
        """One query of the run's report task states, through the triggerer's execution API client."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        by_run = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=self.dag_id, task_ids=[FLEET_REPORT_TASK_ID], run_ids=[self.run_id]
        )
        prefix = f"{FLEET_REPORT_TASK_ID}_"  # mapped instances come back as "<task id>_<map index>"
        return {
            int(task_key.removeprefix(prefix)): str(getattr(state, "value", state))
            for task_key, state in (by_run.get(self.run_id) or {}).items()
            if task_key.startswith(prefix) and state is not None
        }


def _failed(look: asyncio.Future[dict[int, str]]) -> bool:
    return look.done() and (look.cancelled() or look.exception() is not None)


def _ending(decision: Turn) -> TriggerEvent:
    """The turn came: the task ends here, leaving what run_wait_turn leaves, the moment the target's clock starts.
    The run reached max_failures: the task resumes on a worker and decides again from the reports, which name the
    failed connections (this trigger knows only positions) for the reason the target's report gives."""
    if decision.decision == "start":
        return TaskSuccessEvent(xcoms={TARGET_STARTED_KEY: datetime.now(UTC).isoformat()})
    return TriggerEvent({"decision": decision.decision, "reason": decision.reason})
