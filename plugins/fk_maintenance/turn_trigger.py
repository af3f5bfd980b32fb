"""Where the triggerer finds a fleet target's wait that an earlier version deferred (a trigger is stored with its
class path, ``fk_maintenance.turn_trigger.TurnTrigger``): waits in flight during an upgrade keep working. The
trigger lives in fk_maintenance.airflow.turn_trigger."""

from fk_maintenance.airflow.turn_trigger import TurnTrigger

__all__ = ["TurnTrigger"]
