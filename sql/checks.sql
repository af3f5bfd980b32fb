-- End-state checks. Read-only, except reject_missing_parent, which runs inside a transaction that is
-- always rolled back.

-- name: plan_for_children_lookup
EXPLAIN (FORMAT JSON) SELECT {row_key} FROM {table} WHERE {columns_are_values}

-- name: some_pointer
-- A value the key holds (as text, bound back as the columns' types): the lookup to plan, whatever the types.
SELECT {c_columns_as_text} FROM {table} c WHERE {c_key_complete} LIMIT 1

-- name: some_parent
-- A referenced row's key (as text): a probe row with NULLs in its key borrows those columns from it.
SELECT {p_ref_columns_as_text} FROM {ref_table} p LIMIT 1

-- name: some_complete_row
-- A row to point at a missing parent, and its key's values (as text): one whose key is complete, so the probe
-- changes one column and keeps the row's own (its tenant's) values in the others.
SELECT {c_row_key}, {c_columns_as_text} FROM {table} c WHERE {c_key_complete} LIMIT 1 FOR UPDATE OF c SKIP LOCKED

-- name: some_row
SELECT {c_row_key}, {c_columns_as_text} FROM {table} c LIMIT 1 FOR UPDATE OF c SKIP LOCKED

-- name: check_keys_now
-- A DEFERRABLE INITIALLY DEFERRED key checks at COMMIT, which the probe's transaction never reaches: checked at
-- once instead, for this transaction (always rolled back) only.
SET CONSTRAINTS ALL IMMEDIATE

-- name: reject_missing_parent
UPDATE {table} SET {columns_to_probe} WHERE ROW({row_key}) = {row_key_values}

-- name: missing_parent_uuid
-- A value no row has, to point a row at.
SELECT gen_random_uuid()::text

-- name: missing_parent_text
-- A random text no referenced row has (looked up, not assumed), no longer than the column takes.
SELECT v FROM (SELECT left(md5(random()::text) || md5(random()::text), %(max_length)s) AS v) s
WHERE NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column}::text = s.v)

-- name: missing_parent_integer
-- From the bottom of the key's type, where no sequence counting up from 1 ever gets: never max(id) + 1,
-- which the app's next insert may be taking right now.
SELECT v::text
FROM generate_series(%(type_minimum)s::bigint, %(type_minimum)s::bigint + 1000) AS v
WHERE NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = v)
LIMIT 1

-- name: depth_summary
-- Walk down from the roots: rows without a (complete) parent key, and rows whose parent is missing
-- (null_orphans makes those roots, and until then "zero orphans" reports them). A child hangs below the row
-- whose referenced columns its key holds (which need not be its row key). Every row not reached is in a cycle
-- or hangs below one; the walk itself terminates because each row has one parent, so no cycle is reachable
-- from a root.
WITH RECURSIVE tree AS (
    SELECT {c_row_key}, {c_referenced}, 1 AS fk_depth FROM {table} c
    WHERE NOT ({c_key_complete}) OR NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
    UNION ALL
    SELECT {c_row_key}, {c_referenced}, tree.fk_depth + 1
    FROM {table} c JOIN tree ON {c_points_at_tree}
)
SELECT (SELECT count(*) FROM {table}) - count(*) AS unreached,
       coalesce(max(fk_depth), 0) AS max_depth,
       (SELECT {tree_row_key_text} FROM tree WHERE fk_depth > %(max_depth)s LIMIT 1) AS too_deep_example
FROM tree

-- name: chain_up
-- The row keys from a row up through its ancestors (the row whose referenced columns its key holds),
-- stopping at a root or when a row repeats (a cycle).
WITH RECURSIVE up AS (
    SELECT {c_pointer_as_up}, ARRAY[{c_row_key_text}] AS fk_path, false AS fk_is_cycle
    FROM {table} c WHERE {c_row_key_text} = %(start)s
    UNION ALL
    SELECT {c_pointer_as_up}, up.fk_path || {c_row_key_text}, {c_row_key_text} = ANY(up.fk_path)
    FROM up JOIN {table} c ON {c_referenced_is_up}
    WHERE NOT up.fk_is_cycle AND cardinality(up.fk_path) < 1000
)
SELECT fk_path, fk_is_cycle FROM up ORDER BY cardinality(fk_path) DESC LIMIT 1

-- name: unreached_example
-- A row that is not reached from any root (roots as in depth_summary): walk up from it to find the cycle.
WITH RECURSIVE tree AS (
    SELECT {c_row_key}, {c_referenced} FROM {table} c
    WHERE NOT ({c_key_complete}) OR NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
    UNION ALL
    SELECT {c_row_key}, {c_referenced} FROM {table} c JOIN tree ON {c_points_at_tree}
)
SELECT {c_row_key_text} FROM {table} c
WHERE NOT EXISTS (SELECT 1 FROM tree WHERE {tree_is_c})
LIMIT 1

-- name: prefer_index
-- Only to ask whether the index *can* serve the lookup: on a tiny table the planner rightly prefers a scan.
SELECT set_config('enable_seqscan', 'off', true)

-- name: hierarchy_work_mem
-- The walk from the roots keeps every reached row in its work table and hashes the whole table once; with
-- the default 4MB both spill to disk and the check takes 2.5x longer at 1M rows. For this transaction only.
SELECT set_config('work_mem', '128MB', true)
