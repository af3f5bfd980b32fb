"""Errors a run reports to its operator. Each message names what is wrong; none carries a password."""

from __future__ import annotations

from typing import Any


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

    def __init__(self, failures: list[str], summary: dict[str, Any] | None = None) -> None:
        self.failures = failures
        # Every check with its outcome, so the report can show what failed though the step raised.
        self.summary = summary
        super().__init__(f"{len(failures)} post-check(s) failed:\n- " + "\n- ".join(failures))


class OrphansCannotBeNulled(MaintenanceError):
    """Orphans of a NOT NULL key appeared after preflight: nulling them would fail, and nothing was changed."""


class DeleteNotApproved(MaintenanceError):
    """More orphans are there to delete than a person approved: nothing was deleted."""


class DeleteRefused(MaintenanceError):
    """orphans: delete met a row that a RESTRICT or NO ACTION key protects; the batch was rolled back."""


# The library's errors that no retry can fix: the operator has to act.
FINAL_ERRORS: tuple[type[MaintenanceError], ...] = (
    InvalidSettings,
    PoolerNotSupported,
    PreflightFailed,
    PostChecksFailed,
    StepOutOfOrder,
    WindowsExhausted,
    OrphansCannotBeNulled,
    DeleteRefused,
    DeleteNotApproved,
)
# SQLSTATE classes of server errors that a retry meets again until someone changes the schema, the data, the
# privileges or the declaration: feature not supported (0A), cardinality (21), data exception (22), integrity
# constraint violation (23, but for 23503, which a re-sweep after rows the app held clears, and 23505, which two
# first runs meet creating the pipeline's schema or tables at once), syntax error or
# access rule violation (42: undefined objects, missing privileges). Lock
# timeouts (55P03), deadlocks and serialization failures (40), cancellations and shutdowns (57), resources
# (53) and lost connections (08) pass with time.
FINAL_SQLSTATE_CLASSES = ("0A", "21", "22", "23", "42")
RETRYABLE_SQLSTATES = ("23503", "23505")


def is_final(exc: BaseException) -> bool:
    """Whether retrying the step that raised ``exc`` is pointless."""
    if isinstance(exc, FINAL_ERRORS):
        return True
    sqlstate = getattr(exc, "sqlstate", None)  # psycopg.Error's, without importing psycopg here
    return bool(sqlstate) and sqlstate[:2] in FINAL_SQLSTATE_CLASSES and sqlstate not in RETRYABLE_SQLSTATES
