"""Errors a run reports to its operator. Each message names what is wrong; none carries a password."""

from __future__ import annotations


class MaintenanceError(Exception):
    """Base class: a condition the operator must see, raised before or instead of a change."""


class InvalidSettings(MaintenanceError):
    """A trigger-form value (or a programmatic setting) is out of bounds or malformed."""


class TargetUnreachable(MaintenanceError):
    """The target database cannot be connected to (host down, wrong password, unknown database)."""


class PoolerNotSupported(MaintenanceError):
    """The connection goes through a pooler whose mode cannot keep the pipeline's guarantees (transaction
    pooling); refused before any statement that sets anything."""


class PreflightFailed(MaintenanceError):
    """The target differs from the spec, or a same-named object has another definition."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("preflight found problems, nothing was changed:\n- " + "\n- ".join(problems))


class ConcurrentRun(MaintenanceError):
    """Another run (perhaps from another Airflow deployment) is changing the same foreign key."""


class LockNotAcquired(MaintenanceError):
    """Every attempt to take a table lock within lock_timeout failed; the task is left to Airflow's retry."""


class ReplicaLagging(MaintenanceError):
    """Replicas stayed behind by more than max_replica_lag_s for longer than a step may wait; retried later."""


class WindowsExhausted(MaintenanceError):
    """Validation waited for (or was cut short in) the configured number of windows."""


class StepOutOfOrder(MaintenanceError):
    """A step found that a step it builds on has not succeeded (for example, VALIDATE with no constraint)."""


class ValidationCutShort(MaintenanceError):
    """VALIDATE did not finish, or was not started, because the window ended or had too little left."""


class PostChecksFailed(MaintenanceError):
    """One or more end-state assertions failed; all of them are listed."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} post-check(s) failed:\n- " + "\n- ".join(failures))
