"""DAG integrity checks for a deployment's own CI, at the path users' CI files import it from
(``from fk_maintenance.integrity import assert_dag_integrity``); it lives in fk_maintenance.airflow.integrity."""

from fk_maintenance.airflow.integrity import assert_dag_integrity, check_dag_integrity

__all__ = ["assert_dag_integrity", "check_dag_integrity"]
