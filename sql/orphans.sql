-- Orphans: rows whose pointer names a parent that does not exist. Always an anti-join (NOT EXISTS):
-- NOT IN is wrong when the subquery yields a NULL and cannot be planned as a hashed anti-join at scale.

-- name: summary
WITH orphan AS MATERIALIZED (
    SELECT c.{row_key} AS row_key, c.{column} AS pointer
    FROM {table} c
    WHERE c.{column} IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = c.{column})
)
SELECT (SELECT count(*) FROM orphan),
       (SELECT count(DISTINCT pointer) FROM orphan),
       (SELECT coalesce(array_agg(s.row_key::text || ' -> ' || s.pointer::text), '{{}}')
          FROM (SELECT row_key, pointer FROM orphan ORDER BY row_key LIMIT %(sample_size)s) s)

-- name: keys
SELECT c.{row_key}
FROM {table} c
WHERE c.{column} IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = c.{column})
ORDER BY c.{row_key}

-- name: plan_for_all_rows
SELECT set_config('cursor_tuple_fraction', '1.0', true)

-- name: count_held_keys
-- How many keys the held cursor of the statement above holds (the command tag of MOVE says it).
MOVE FORWARD ALL IN {cursor}

-- name: count
SELECT count(*)
FROM {table} c
WHERE c.{column} IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = c.{column})

-- name: null_batch
-- One batch, one transaction: re-check each row is still an orphan (a parent created meanwhile keeps its
-- child), lock it without waiting on the app (rows it holds are left for the re-sweep), audit, then null.
WITH still_orphaned AS (
    SELECT c.{row_key} AS row_key, c.{column} AS pointer
    FROM {table} c
    WHERE c.{row_key} = ANY(%(keys)s)
      AND c.{column} IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = c.{column})
    FOR UPDATE OF c SKIP LOCKED
), audited AS (
    INSERT INTO {audit} (run_id, kpi_id, old_parent_kpi_id, nulled_at)
    SELECT %(run_id)s, row_key, pointer, clock_timestamp() FROM still_orphaned
    -- The same run can meet a row twice (the app re-pointed it after we nulled it): keep the latest value.
    ON CONFLICT (run_id, kpi_id) DO UPDATE
        SET old_parent_kpi_id = EXCLUDED.old_parent_kpi_id, nulled_at = EXCLUDED.nulled_at
    RETURNING kpi_id, old_parent_kpi_id
), nulled AS (
    UPDATE {table} t SET {column} = NULL
    FROM audited a
    WHERE t.{row_key} = a.kpi_id AND t.{column} = a.old_parent_kpi_id
    RETURNING t.{row_key}
), recorded AS (
    -- This transaction wrote the rows' new versions (their xmin): a restore puts a pointer back only where the
    -- row is still that version, so whatever anyone wrote to the row since is left alone.
    INSERT INTO {nulling_transactions} (audit_table, run_id, xact)
    SELECT %(audit_name)s, %(run_id)s, pg_current_xact_id() WHERE EXISTS (SELECT 1 FROM nulled)
    ON CONFLICT DO NOTHING
)
SELECT (SELECT count(*) FROM audited), (SELECT count(*) FROM nulled)

-- name: audited_for_run
-- What a run nulled, from the audit itself: whatever a retried or killed try of a step reported.
SELECT count(*) FROM {audit} WHERE run_id = %(run_id)s
