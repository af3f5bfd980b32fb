"""A fleet target's wait for its turn, run by Airflow's triggerer instead of a rescheduled sensor.

A reschedule-mode sensor is one task run per look, and Airflow can fail it when the executor's event for one look
arrives after the next look was queued (apache/airflow#71172): the more targets wait, the more targets are lost
without ever being touched. A deferred task has no such race (the scheduler knows a resumed deferral), holds no
worker slot, and its looks are one query of task states each, made by the triggerer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from .fleet import FLEET_GROUP, reports_from_states, turn
from .settings import RunSettings
from .steps import REPORT_TASK

FLEET_REPORT_TASK_ID = f"{FLEET_GROUP}.{REPORT_TASK}"


class TurnTrigger(BaseTrigger):
    """Fires once the target at ``position`` may start, or must never start (``max_failures`` reached), judged from
    the states of the fleet's report tasks in this run. The task that resumes decides again from the reports."""

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
            decision = turn(self.position, reports_from_states(await self._report_states()), settings)
            if decision.decision != "wait":
                self.log.info("turn of #%d: %s (%s)", self.position, decision.decision, decision.reason)
                yield TriggerEvent({"decision": decision.decision, "reason": decision.reason})
                return
            await asyncio.sleep(self.poke_seconds)

    async def _report_states(self) -> dict[int, str]:
        """State of each fleet target's report task in this run, by map index."""
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
