-- Restore: put back the pointers one run nulled, in batches of audit rows taken in key order. A pointer is put
-- back only where the row is still the version the run's own transaction wrote (its xmin is one of the run's
-- nulling transactions) and the audited parent exists again; whatever anyone wrote since (a row re-pointed,
-- made a root on purpose, edited, or deleted) is newer than the audit and is left alone.

-- name: create_log
CREATE TABLE IF NOT EXISTS {restore_log} (
    restore_id  text        NOT NULL,
    audit_table text        NOT NULL,
    run_id      text        NOT NULL,
    row_key     text        NOT NULL,  -- a composite row key as (a, b)
    parent      text        NOT NULL,  -- the key's whole value put back, as (a, b) for a composite key
    restored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (restore_id, audit_table, run_id, row_key)
)

-- name: comment_log
COMMENT ON TABLE {restore_log} IS 'kpi-fk-maintenance: every pointer a restore run put back (restore_id is its Airflow run id)'

-- name: first_batch
SELECT {audit_row_key} FROM {audit} a WHERE a.run_id = %(run_id)s ORDER BY {audit_row_key} LIMIT %(limit)s

-- name: next_batch
SELECT {audit_row_key} FROM {audit} a
WHERE a.run_id = %(run_id)s AND ROW({audit_row_key}) > {after}
ORDER BY {audit_row_key} LIMIT %(limit)s

-- name: audited_rows
-- How many audit rows of the run a table holds (the pipeline's audit table, or an earlier version's).
SELECT count(*) FROM {audited} WHERE run_id = %(run_id)s

-- name: run_transactions
-- The low 32 bits of each transaction that nulled the run's pointers: what a row's xmin holds.
SELECT (x.xact::text::bigint %% 4294967296) FROM {nulling_transactions} x
WHERE x.audit_table = %(audit_name)s AND x.run_id = %(run_id)s

-- name: classify_batch
-- What each audited row of the batch is now (read-only; the dry run reports only this). "Nulled" means the
-- columns the run nulled are all NULL. With any_version the run predates the record of nulling transactions,
-- so any version of a nulled row counts as ours.
WITH now_is AS (
    SELECT t.ctid IS NULL AS row_deleted,
           t.ctid IS NOT NULL AND {t_pointer_row} IS NOT DISTINCT FROM {a_pointer_row} AS already_restored,
           t.ctid IS NOT NULL AND {t_nulled} AS nulled,
           (%(any_version)s OR t.xmin::text::bigint = ANY(%(xids)s::bigint[])) IS TRUE AS ours,
           p.ctid IS NOT NULL AS parent_exists
    FROM {audit} a
    JOIN {batch_keys} ON {a_is_batch_key}
    LEFT JOIN {table} t ON {t_is_audited_row}
    LEFT JOIN {ref_table} p ON {p_is_audited_parent}
    WHERE a.run_id = %(run_id)s
)
SELECT count(*) FILTER (WHERE row_deleted),
       count(*) FILTER (WHERE already_restored),
       count(*) FILTER (WHERE NOT row_deleted AND NOT already_restored AND NOT nulled) AS repointed_by_app,
       count(*) FILTER (WHERE nulled AND NOT ours) AS changed_since,
       count(*) FILTER (WHERE nulled AND ours AND NOT parent_exists) AS parent_still_missing,
       count(*) FILTER (WHERE nulled AND ours AND parent_exists) AS restorable
FROM now_is

-- name: restore_batch
-- One batch, one transaction: lock the restorable rows without waiting on the app (rows it holds are left
-- for the next restore run), put back the columns the run nulled, and record each row. A row the app wrote
-- between the classification and the lock is re-checked on its new version, whose xmin is not ours.
WITH restorable AS (
    SELECT {a_copied}
    FROM {audit} a
    JOIN {batch_keys} ON {a_is_batch_key}
    JOIN {table} t ON {t_is_audited_row}
    WHERE a.run_id = %(run_id)s
      AND {t_nulled}
      AND (%(any_version)s OR t.xmin::text::bigint = ANY(%(xids)s::bigint[]))
      AND EXISTS (SELECT 1 FROM {ref_table} p WHERE {p_is_audited_parent})
    FOR UPDATE OF t SKIP LOCKED
), restored AS (
    UPDATE {table} t SET {set_nulled_from_audit}
    FROM restorable a
    WHERE {t_is_audited_row}
    RETURNING {t_row_key_text} AS row_key, {t_pointer_text} AS parent
), recorded AS (
    INSERT INTO {restore_log} (restore_id, audit_table, run_id, row_key, parent, restored_at)
    SELECT %(restore_id)s, %(audit_name)s, %(run_id)s, row_key, parent, clock_timestamp() FROM restored
    RETURNING 1
)
SELECT (SELECT count(*) FROM restored), (SELECT count(*) FROM recorded)
