-- Orphans: rows whose key names a parent that does not exist. Always an anti-join (NOT EXISTS): NOT IN is
-- wrong when the subquery yields a NULL and cannot be planned as a hashed anti-join at scale. Only rows the key
-- checks are looked at ({c_key_checked}): under MATCH SIMPLE a row with any NULL in the key is never an orphan;
-- under MATCH FULL only an all-NULL key passes, and one with some columns NULL equals no parent, so it is an
-- orphan. A composite key's orphan is a row whose whole tuple has no match (a parent_id that exists in another
-- tenant included).

-- name: summary
WITH orphan AS MATERIALIZED (
    SELECT {c_row_key_text} AS fk_row_key, {c_pointer_text} AS fk_pointer, {c_row_key}
    FROM {table} c
    WHERE {c_key_checked}
      AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
)
SELECT (SELECT count(*) FROM orphan),
       (SELECT count(DISTINCT fk_pointer) FROM orphan),
       (SELECT coalesce(array_agg(s.fk_row_key || ' -> ' || s.fk_pointer), '{{}}')
          FROM (SELECT fk_row_key, fk_pointer FROM orphan ORDER BY {row_key} LIMIT %(sample_size)s) s)

-- name: keys
SELECT {c_row_key}
FROM {table} c
WHERE {c_key_checked}
  AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
ORDER BY {c_row_key}

-- name: keys_by_table
-- With the table (partition) each row is in: a batch is nulled on its own partition, where the planner probes
-- one primary key per row (through the parent it planned the batch as a scan of every partition).
SELECT c.tableoid, {c_row_key}
FROM {table} c
WHERE {c_key_checked}
  AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
ORDER BY c.tableoid, {c_row_key}

-- name: plan_for_all_rows
SELECT set_config('cursor_tuple_fraction', '1.0', true)

-- name: count_held_keys
-- How many keys the held cursor of the statement above holds (the command tag of MOVE says it).
MOVE FORWARD ALL IN {cursor}

-- name: count
SELECT count(*)
FROM {table} c
WHERE {c_key_checked}
  AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})

-- name: null_batch
-- One batch, one transaction: re-check each row is still an orphan (a parent created meanwhile keeps its
-- child), lock it without waiting on the app (rows it holds are left for the re-sweep), audit the whole old
-- key, then null the columns nulling sets to NULL ({set_nulled}).
-- The batch's keys drive: one primary-key probe per key (a locking subquery is never flattened into a join,
-- so the planner cannot turn it into a scan of the whole table against the batch, which it did on partitions).
WITH still_orphaned AS (
    SELECT still.*
    FROM {batch_keys}
    CROSS JOIN LATERAL (
        SELECT {c_as_audit}
        FROM {table} c
        WHERE {c_is_batch_key} AND {c_key_checked}
          AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
        FOR UPDATE OF c SKIP LOCKED
    ) still
), audited AS (
    INSERT INTO {audit} (run_id, {audit_row_key}, {audit_pointer}, nulled_at)
    SELECT %(run_id)s, {audit_row_key}, {audit_pointer}, clock_timestamp() FROM still_orphaned
    -- The same run can meet a row twice (the app re-pointed it after we nulled it): keep the latest value.
    ON CONFLICT (run_id, {audit_row_key}) DO UPDATE
        SET {audit_pointer_from_excluded}, nulled_at = EXCLUDED.nulled_at
    RETURNING {audit_row_key}, {audit_pointer}
), nulled AS (
    UPDATE {table} t SET {set_nulled}
    FROM audited a
    WHERE {t_is_audited_row} AND {t_points_as_audited}
    RETURNING 1
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
