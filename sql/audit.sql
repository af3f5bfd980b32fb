-- The audit table: every pointer we null is written here first, in the same transaction.

-- name: create_table
CREATE TABLE IF NOT EXISTS {audit} (
    run_id            text        NOT NULL,
    kpi_id            {key_type}  NOT NULL,
    old_parent_kpi_id {pointer_type} NOT NULL,
    nulled_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, kpi_id)
)

-- name: comment_table
COMMENT ON TABLE {audit} IS 'kpi-fk-maintenance: dangling parent pointers nulled before adding a foreign key; restore with the README''s UPDATE'

-- name: restore_run
-- Puts back pointers nulled by one run, where the row still has no parent and the parent exists now.
-- A pointer the app has since set to something else is left alone: the app's write is newer.
WITH restorable AS (
    SELECT a.kpi_id, a.old_parent_kpi_id
    FROM {audit} a
    JOIN {table} t ON t.{row_key} = a.kpi_id
    WHERE a.run_id = %(run_id)s
      AND t.{column} IS NULL
      AND EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = a.old_parent_kpi_id)
    FOR UPDATE OF t
), restored AS (
    UPDATE {table} t SET {column} = r.old_parent_kpi_id
    FROM restorable r
    WHERE t.{row_key} = r.kpi_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM restored),
       (SELECT count(*) FROM {audit} WHERE run_id = %(run_id)s)
