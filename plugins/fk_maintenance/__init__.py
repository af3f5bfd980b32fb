"""Bring a live PostgreSQL table to a declared, validated foreign key and its index, safely.

Each step is a function of a psycopg 3 connection, a ForeignKeySpec and RunSettings, returning a small
summary dict; ``steps.STEPS`` lists them in order, and the Airflow DAG in dags/ only wires them. Import the
modules themselves (``fk_maintenance.orphans``, ...): this top level stays empty so that the DAG parser,
which imports ``fk_maintenance.settings`` and ``fk_maintenance.steps``, loads nothing else.
"""
