"""Bring a live PostgreSQL table to a declared, validated foreign key and its index, safely.

Each step is a function of a psycopg 3 connection, a ForeignKeySpec and RunSettings, returning a small
summary dict; the Airflow DAG in dags/ only wires them. Step modules import psycopg, so import them from
here lazily (this package's top level stays cheap for the DAG parser).
"""

from .errors import (
    ConcurrentRun,
    InvalidSettings,
    LockNotAcquired,
    MaintenanceError,
    PostChecksFailed,
    PreflightFailed,
    TargetUnreachable,
    WindowsExhausted,
)
from .settings import SETTING_DEFS, RunSettings
from .spec import VISION_KPIS_PARENT_FK, ForeignKeySpec

__all__ = [
    "SETTING_DEFS",
    "VISION_KPIS_PARENT_FK",
    "ConcurrentRun",
    "ForeignKeySpec",
    "InvalidSettings",
    "LockNotAcquired",
    "MaintenanceError",
    "PostChecksFailed",
    "PreflightFailed",
    "RunSettings",
    "TargetUnreachable",
    "WindowsExhausted",
]
