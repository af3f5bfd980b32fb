-- End-state checks. Read-only, except reject_missing_parent, which runs inside a transaction that is
-- always rolled back.

-- name: plan_for_children_lookup
EXPLAIN (FORMAT JSON) SELECT {row_key} FROM {table} WHERE {column} = %(value)s

-- name: some_pointer
-- A value the column holds (as text, bound back as the column's type): the lookup to plan, whatever the type.
SELECT {column}::text FROM {table} WHERE {column} IS NOT NULL LIMIT 1

-- name: some_row_key
SELECT {row_key} FROM {table} LIMIT 1 FOR UPDATE SKIP LOCKED

-- name: reject_missing_parent
UPDATE {table} SET {column} = %(missing)s WHERE {row_key} = %(row_key)s

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
-- Walk down from the roots: rows without a parent, and rows whose parent is missing (null_orphans makes those
-- roots, and until then "zero orphans" reports them). A child hangs below the row whose referenced column its
-- pointer holds (which need not be its row key). Every row not reached is in a cycle or hangs below one; the
-- walk itself terminates because each row has one parent, so no cycle is reachable from a root.
WITH RECURSIVE tree AS (
    SELECT c.{row_key} AS row_key, c.{ref_column} AS referenced, 1 AS depth FROM {table} c
    WHERE c.{column} IS NULL OR NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = c.{column})
    UNION ALL
    SELECT c.{row_key}, c.{ref_column}, t.depth + 1
    FROM {table} c JOIN tree t ON c.{column} = t.referenced
)
SELECT (SELECT count(*) FROM {table}) - count(*) AS unreached,
       coalesce(max(depth), 0) AS max_depth,
       (SELECT row_key::text FROM tree WHERE depth > %(max_depth)s LIMIT 1) AS too_deep_example
FROM tree

-- name: chain_up
-- The row keys from a row up through its ancestors (the row whose referenced column its pointer holds),
-- stopping at a root or when a row repeats (a cycle).
WITH RECURSIVE up AS (
    SELECT {row_key} AS row_key, {column} AS parent, ARRAY[{row_key}::text] AS path, false AS is_cycle
    FROM {table} WHERE {row_key}::text = %(start)s
    UNION ALL
    SELECT t.{row_key}, t.{column}, u.path || t.{row_key}::text, t.{row_key}::text = ANY(u.path)
    FROM up u JOIN {table} t ON t.{ref_column} = u.parent
    WHERE NOT u.is_cycle AND cardinality(u.path) < 1000
)
SELECT path, is_cycle FROM up ORDER BY cardinality(path) DESC LIMIT 1

-- name: unreached_example
-- A row that is not reached from any root (roots as in depth_summary): walk up from it to find the cycle.
WITH RECURSIVE tree AS (
    SELECT c.{row_key} AS row_key, c.{ref_column} AS referenced FROM {table} c
    WHERE c.{column} IS NULL OR NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE p.{ref_column} = c.{column})
    UNION ALL
    SELECT c.{row_key}, c.{ref_column} FROM {table} c JOIN tree t ON c.{column} = t.referenced
)
SELECT x.{row_key}::text FROM {table} x
WHERE NOT EXISTS (SELECT 1 FROM tree WHERE tree.row_key = x.{row_key})
LIMIT 1

-- name: prefer_index
-- Only to ask whether the index *can* serve the lookup: on a tiny table the planner rightly prefers a scan.
SELECT set_config('enable_seqscan', 'off', true)

-- name: hierarchy_work_mem
-- The walk from the roots keeps every reached row in its work table and hashes the whole table once; with
-- the default 4MB both spill to disk and the check takes 2.5x longer at 1M rows. For this transaction only.
SELECT set_config('work_mem', '128MB', true)
