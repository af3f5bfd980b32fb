# The Airflow image for this pipeline: the official 3.3.2 image, this project's pinned requirements, and the
# fk_maintenance package itself (its SQL inside it). docker-compose.yml mounts only dags/.
FROM apache/airflow:3.3.2

COPY --chown=airflow:root requirements.txt /opt/airflow/requirements.txt
RUN pip install --no-cache-dir -r /opt/airflow/requirements.txt

COPY --chown=airflow:root pyproject.toml /opt/fk-maintenance/pyproject.toml
COPY --chown=airflow:root plugins/fk_maintenance /opt/fk-maintenance/plugins/fk_maintenance
COPY --chown=airflow:root sql /opt/fk-maintenance/sql
RUN pip install --no-cache-dir --no-deps /opt/fk-maintenance

# COPY --chown=airflow:root dags/ /opt/airflow/dags/
