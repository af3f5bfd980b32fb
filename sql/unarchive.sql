-- Restore of an orphans: delete run from its archive (records/unarchive.py): each row the run deleted or changed
-- goes back once, as its last record says, with every value it had before the run touched it; whatever anyone
-- wrote since is left alone.

-- name: final_records
-- The run's last record of each row (a row several batches touched: the last batch's, its first record), in
-- the order rows go back (parents before children). With it: the row's origin, the batch of the earliest record
-- of the unbroken chain that ends there (each later batch found the version the batch before it wrote, so nobody
-- wrote the row between), whose row is the row before the run touched it; the chain's records (put back
-- together); the run's earlier records beyond a break (written since, left alone); and whether a restore
-- already put it back (by_this: this restore, in an earlier pass). Each row's story is read with window
-- functions over the run's records, one sort, so an archive of an earlier version (no index on rows, no chain:
-- each record its own origin) reads the same.
WITH run AS (
    SELECT a.seq, a.batch, a.depth, a.table_schema, a.table_name, a.row_key, a.action, a.via, a.relid, a.columns,
           a.row_data, {a_row_text} AS row_text, {a_filenode} AS filenode, {a_written_md5} AS written_md5,
           max(a.batch) OVER story AS last_batch,
           max(a.batch) FILTER (WHERE NOT coalesce({a_prior_intact}, false)) OVER story AS origin_batch
    FROM {archive} a
    WHERE a.run_id = %(run_id)s
    WINDOW story AS (PARTITION BY a.table_schema, a.table_name, a.row_key)
), finals AS (
    -- One row per archived row, no join: the last batch's first record, the origin batch's image, the story.
    SELECT (array_agg(r.depth ORDER BY r.seq) FILTER (WHERE r.batch = r.last_batch))[1] AS depth,
           (array_agg(r.seq ORDER BY r.seq) FILTER (WHERE r.batch = r.last_batch))[1] AS seq,
           r.table_schema, r.table_name, r.row_key,
           (array_agg(r.action ORDER BY r.seq) FILTER (WHERE r.batch = r.last_batch))[1] AS action,
           (array_agg(r.via ORDER BY r.seq) FILTER (WHERE r.batch = r.last_batch))[1] AS via,
           (array_agg(r.relid ORDER BY r.seq) FILTER (WHERE r.batch = r.last_batch))[1] AS relid,
           max(r.last_batch) AS batch,
           (array_agg(r.filenode ORDER BY r.seq) FILTER (WHERE r.batch = r.last_batch))[1] AS filenode,
           (array_agg(r.written_md5 ORDER BY r.seq) FILTER (WHERE r.batch = r.last_batch))[1] AS written_md5,
           max(r.origin_batch) AS origin_batch,
           (array_agg(r.row_text ORDER BY r.seq) FILTER (WHERE r.batch = r.origin_batch))[1] AS row_text,
           (array_agg(r.row_data ORDER BY r.seq) FILTER (WHERE r.batch = r.origin_batch))[1] AS row_data,
           jsonb_agg(jsonb_build_array(r.action, r.via, r.columns) ORDER BY r.batch, r.seq)
               FILTER (WHERE r.batch >= r.origin_batch) AS members,
           coalesce(jsonb_agg(r.action ORDER BY r.batch, r.seq) FILTER (WHERE r.batch < r.origin_batch), '[]')
               AS superseded
    FROM run r
    GROUP BY r.table_schema, r.table_name, r.row_key
)
SELECT f.depth, f.seq, f.table_schema, f.table_name, f.row_key::text, f.action, f.via, f.relid, f.batch,
       f.filenode, f.written_md5, f.origin_batch, f.row_text, f.row_data::text, f.members::text,
       f.superseded::text,
       ({logged} -> (f.table_schema || '.' || f.table_name || ' ' || f.row_key::text
                     || CASE WHEN f.action = 'deleted' THEN '' ELSE ' ' || f.via END))::boolean
FROM finals f
WHERE f.action = ANY(%(actions)s) AND (%(only)s::bigint[] IS NULL OR f.seq = ANY(%(only)s::bigint[]))
ORDER BY f.depth, f.seq

-- name: logged
-- What restores of the run put back, one object by the restore log's row_key (table, row key, and the key for a
-- pointer): true where this restore did. Read once per query (no join whose plan the archive's statistics,
-- stale right after a delete, could make quadratic).
(SELECT coalesce(jsonb_object_agg(l.row_key, l.by_this), '{{}}')
 FROM (SELECT l.row_key, bool_or(l.restore_id = %(restore_id)s) AS by_this
       FROM {restore_log} l
       WHERE l.audit_table = %(audit_name)s AND l.run_id = %(run_id)s
       GROUP BY l.row_key) l)

-- name: nothing_logged
'{{}}'::jsonb

-- name: run_tables
-- The tables the run deleted rows from or changed columns of, as a restore will write to them.
SELECT a.table_schema, a.table_name, to_regclass(format('%%I.%%I', a.table_schema, a.table_name))::oid,
       bool_or(a.action = 'deleted'),
       coalesce(array_agg(DISTINCT c.name) FILTER (WHERE c.name IS NOT NULL), '{{}}')
FROM {archive} a
LEFT JOIN LATERAL unnest(CASE WHEN a.action <> 'deleted' THEN a.columns END) AS c(name) ON true
WHERE a.run_id = %(run_id)s
GROUP BY a.table_schema, a.table_name
ORDER BY 1, 2

-- name: table_facts
-- A table a restore writes to: its oid, the columns an INSERT writes (not generated ones, which the server
-- computes again), and the nullable columns of its foreign keys (a row that points at a row not back yet, which
-- points back at it, goes in with them NULL and gets them in the same transaction).
SELECT c.oid,
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''),
       (SELECT coalesce(array_agg(DISTINCT a.attname::text), '{{}}')
        FROM pg_constraint con
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = ANY(con.conkey)
        WHERE con.contype = 'f' AND con.conrelid = c.oid AND NOT a.attnotnull AND a.attgenerated = '')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(table)s

-- name: key_types
-- The types of a row key's columns now (format_type), to read archived keys back typed.
SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
FROM unnest(%(names)s::text[]) WITH ORDINALITY AS k(name, ord)
JOIN pg_attribute a ON a.attrelid = %(relid)s::oid AND a.attname = k.name AND NOT a.attisdropped

-- name: begin_restore
-- A restore's transaction: the setting a trigger reads to step aside (restorable.RESTORING_SETTING).
SELECT set_config('fk_maintenance.restoring', 'on', true)

-- name: immediate
-- Deferred keys and constraint triggers checked at each statement, inside the row's savepoint, so one row a
-- deferred key refuses is counted and the others commit.
SET CONSTRAINTS ALL IMMEDIATE

-- name: deferred
-- Rows that wait on each other go back together: DEFERRABLE keys checked once all are in.
SET CONSTRAINTS ALL DEFERRED

-- name: text_reads_back
-- Whether the archived row's text still reads as a row of the table with the archived values (a column added,
-- dropped or retyped since may make it read otherwise, or not at all): then it is the exact image.
SELECT to_jsonb(%(text)s::{rel}) = %(json)s::jsonb

-- name: row_now
-- The row of that key now, if any: whether it is the image the restore would put back (already back).
SELECT (%(text)s::text IS NOT NULL AND t::text = %(text)s::text) OR to_jsonb(t) = %(json)s::jsonb
FROM {rel} t, {key}
WHERE {t_is_k}

-- name: declared_parent
-- The declared key, which may not exist in the catalog yet (nothing would refuse an orphan), holds for the
-- image: a key it checks ({c_key_checked}: MATCH SIMPLE, complete; FULL, not all NULL) has its parent there.
SELECT NOT ({c_key_checked}) OR EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
FROM jsonb_populate_record(%(base)s::{table}, %(overrides)s::jsonb) c

-- name: insert_image
-- The row as it was: from its own text (base; exact), else from its jsonb (overrides), with the columns in nulls
-- NULL for now (a cycle of keys). A row of that key (or of another unique value of it) written since is left
-- alone: nothing inserted.
INSERT INTO {rel} ({columns}) OVERRIDING SYSTEM VALUE
SELECT {r_columns} FROM jsonb_populate_record(%(base)s::{rel}, %(overrides)s::jsonb || %(nulls)s::jsonb) r
ON CONFLICT DO NOTHING

-- name: update_deferred
-- The columns a cycle's row went in without, from the image, on the row this transaction inserted.
UPDATE {rel} t SET {set_from_r}
FROM jsonb_populate_record(%(base)s::{rel}, %(overrides)s::jsonb) r, {key}
WHERE {t_is_k}

-- name: ours
-- The row is the version the run's last batch wrote: its xmin, while the partition's file is the one the
-- batch saw; after a rewrite (ALTER TABLE ... TYPE, VACUUM FULL, pg_repack), which gives the rows new xmins or
-- moves them, its text is exactly the one the SET NULL left.
((t.xmin::text::bigint = %(xmin)s
  AND (%(filenode)s::oid IS NULL
       OR (t.tableoid = %(relid)s::oid AND pg_relation_filenode(t.tableoid) = %(filenode)s::oid)))
 OR (pg_relation_filenode(t.tableoid) IS DISTINCT FROM %(filenode)s::oid AND md5(t::text) = %(written)s))

-- name: put_back_pointer
-- One statement: lock the row only if it is still our version (never waiting on the app: a row it holds is
-- busy, tried again by the next restore), then put the values back from the image. A version the app wrote
-- after this statement began is re-checked under the lock, and is not ours.
WITH target AS (
    SELECT t.tableoid, t.ctid
    FROM {rel} t, {key}
    WHERE {t_is_k} AND {ours}
    FOR UPDATE OF t SKIP LOCKED
), put AS (
    UPDATE {rel} t SET {set_from_r}
    FROM target x, jsonb_populate_record(%(base)s::{rel}, %(overrides)s::jsonb) r
    WHERE t.tableoid = x.tableoid AND t.ctid = x.ctid
    RETURNING 1
)
SELECT count(*) FROM put

-- name: pointer_now
-- Why a pointer was not put back: the row is gone (no row), is still ours (the app holds it: busy), already has
-- the values, or was written since.
SELECT {ours}, ROW({t_columns}) IS NOT DISTINCT FROM ROW({r_columns})
FROM {rel} t, {key}, jsonb_populate_record(%(base)s::{rel}, %(overrides)s::jsonb) r
WHERE {t_is_k}

-- name: log_restored
-- What one transaction of the restore put back, written with it.
INSERT INTO {restore_log} (restore_id, audit_table, run_id, row_key, parent, restored_at)
SELECT %(restore_id)s, %(audit_name)s, %(run_id)s, e.row_key, e.what, clock_timestamp()
FROM jsonb_to_recordset(%(entries)s::jsonb) AS e(row_key text, what text)
ON CONFLICT DO NOTHING
