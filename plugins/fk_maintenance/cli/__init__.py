"""The ``fk-maintenance`` command: the declared keys outside Airflow (check, plan, run, restore)."""
