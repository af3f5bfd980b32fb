-- Restore: put back the pointers one run nulled, in batches of audit rows taken in key order. A pointer is put
-- back only where the row is still the version the run's own transaction wrote (its xmin is one of the run's
-- nulling transactions) and the audited parent exists again; whatever anyone wrote since (a row re-pointed,
-- made a root on purpose, edited, or deleted) is newer than the audit and is left alone.

-- name: create_log
CREATE TABLE IF NOT EXISTS {restore_log} (
    restore_id  text        NOT NULL,
    audit_table text        NOT NULL,
    run_id      text        NOT NULL,
    row_key     text        NOT NULL,
    parent      text        NOT NULL,
    restored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (restore_id, audit_table, run_id, row_key)
)

-- name: comment_log
COMMENT ON TABLE {restore_log} IS 'kpi-fk-maintenance: every pointer a restore run put back (restore_id is its Airflow run id)'

-- name: first_batch
SELECT a.kpi_id FROM {audit} a WHERE a.run_id = %(run_id)s ORDER BY a.kpi_id LIMIT %(limit)s

-- name: next_batch
SELECT a.kpi_id FROM {audit} a WHERE a.run_id = %(run_id)s AND a.kpi_id > %(after)s ORDER BY a.kpi_id LIMIT %(limit)s

-- name: audited_rows
-- How many audit rows of the run a table holds (the pipeline's audit table, or an earlier version's).
SELECT count(*) FROM {audited} WHERE run_id = %(run_id)s

-- name: run_transactions
-- The low 32 bits of each transaction that nulled the run's pointers: what a row's xmin holds.
SELECT (x.xact::text::bigint %% 4294967296) FROM {nulling_transactions} x
WHERE x.audit_table = %(audit_name)s AND x.run_id = %(run_id)s

-- name: classify_batch
-- What each audited row of the batch is now (read-only; the dry run reports only this). With any_version the
-- run predates the record of nulling transactions, so any version of a parentless row counts as ours.
SELECT count(*) FILTER (WHERE t.{row_key} IS NULL) AS row_deleted,
       count(*) FILTER (WHERE t.{column} = a.old_parent_kpi_id) AS already_restored,
       count(*) FILTER (WHERE t.{column} IS DISTINCT FROM a.old_parent_kpi_id AND t.{column} IS NOT NULL)
           AS repointed_by_app,
       count(*) FILTER (WHERE t.{column} IS NULL
                          AND NOT (%(any_version)s OR t.xmin::text::bigint = ANY(%(xids)s::bigint[])))
           AS changed_since,
       count(*) FILTER (WHERE t.{column} IS NULL AND p.{ref_column} IS NULL
                          AND (%(any_version)s OR t.xmin::text::bigint = ANY(%(xids)s::bigint[])))
           AS parent_still_missing,
       count(*) FILTER (WHERE t.{column} IS NULL AND p.{ref_column} IS NOT NULL
                          AND (%(any_version)s OR t.xmin::text::bigint = ANY(%(xids)s::bigint[])))
           AS restorable
FROM {audit} a
LEFT JOIN {table} t ON t.{row_key} = a.kpi_id
LEFT JOIN {ref_table} p ON p.{ref_column} = a.old_parent_kpi_id
WHERE a.run_id = %(run_id)s AND a.kpi_id = ANY(%(keys)s)

-- name: restore_batch
-- One batch, one transaction: lock the restorable rows without waiting on the app (rows it holds are left
-- for the next restore run), put their pointers back, and record each one. A row the app wrote between the
-- classification and the lock is re-checked on its new version, whose xmin is not ours.
WITH restorable AS (
    SELECT t.{row_key} AS row_key, a.old_parent_kpi_id AS parent
    FROM {audit} a
    JOIN {table} t ON t.{row_key} = a.kpi_id
    WHERE a.run_id = %(run_id)s AND a.kpi_id = ANY(%(keys)s)
      AND t.{column} IS NULL
      AND (%(any_version)s OR t.xmin::text::bigint = ANY(%(xids)s::bigint[]))
      AND EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = a.old_parent_kpi_id)
    FOR UPDATE OF t SKIP LOCKED
), restored AS (
    UPDATE {table} t SET {column} = r.parent
    FROM restorable r
    WHERE t.{row_key} = r.row_key
    RETURNING t.{row_key} AS row_key, t.{column} AS parent
), recorded AS (
    INSERT INTO {restore_log} (restore_id, audit_table, run_id, row_key, parent, restored_at)
    SELECT %(restore_id)s, %(audit_name)s, %(run_id)s, row_key::text, parent::text, clock_timestamp() FROM restored
    RETURNING 1
)
SELECT (SELECT count(*) FROM restored), (SELECT count(*) FROM recorded)
