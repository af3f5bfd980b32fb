# The Airflow image for this pipeline: the official 3.3.2 image plus this project's pinned requirements.
# dags/, plugins/ and sql/ are mounted by docker-compose.yml (or baked in by uncommenting the COPY lines).
FROM apache/airflow:3.3.2

COPY --chown=airflow:root requirements.txt /opt/airflow/requirements.txt
RUN pip install --no-cache-dir -r /opt/airflow/requirements.txt

# COPY --chown=airflow:root dags/ /opt/airflow/dags/
# COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
# COPY --chown=airflow:root sql/ /opt/airflow/sql/
