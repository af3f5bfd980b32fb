"""The Airflow side: task callables, the approval gate on Airflow's human-in-the-loop operator, fleet
planning and the triggerer's wait for a turn, Asset events, notifiers, and the DAG integrity checks a
deployment's CI imports.
"""
