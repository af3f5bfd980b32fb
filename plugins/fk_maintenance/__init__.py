"""Bring a live PostgreSQL table to a declared, validated foreign key and its index, safely.

Each step is a function of a psycopg 3 connection, a ForeignKeySpec and RunSettings, returning a small
summary dict; ``steps.registry.STEPS`` lists them in order, and the Airflow DAG in dags/ only wires them.

The rooms, each importing only from the ones before it:

- ``errors``: what a run reports to its operator;
- ``keys``: the key model and its sources (spec, targets file, run settings, window);
- ``db``: SQL composition, catalog, session discipline, topology, parallel workers;
- ``records``: the audit of nulled pointers, the delete engine and its archive, approval rule, restore;
- ``steps``: the pipeline's steps and the run's report;
- ``airflow``: Airflow's side (tasks, approval gate, fleet, triggerer, assets, notifiers, integrity checks);
- ``cli``: the ``fk-maintenance`` command.

Import the modules themselves (``fk_maintenance.steps.orphans``, ...): this top level stays empty so that the
DAG parser, which imports ``fk_maintenance.keys.settings`` and ``fk_maintenance.steps.registry``, loads nothing
else.
"""
