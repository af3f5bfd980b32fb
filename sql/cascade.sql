-- orphans: delete. What deleting an orphan takes along, found from the catalog's own foreign keys, and the
-- archive that keeps every row and pointer a delete removes or changes, written in the delete's transaction.

-- name: referencing_keys
-- Every foreign key that references the relation (or, for a partition, one of its ancestors): its action on
-- delete, the referencing table, the pairs of columns, and the columns SET NULL (...) / SET DEFAULT (...) acts
-- on (confdelsetcols, PostgreSQL 15+, read through to_jsonb so the query runs where it is absent). Only the
-- keys a user declared (conparentid = 0): a partitioned table's clones per partition act as their parent does.
SELECT con.conname::text, con.confdeltype::text, n.nspname::text, c.relname::text, c.oid, c.relkind::text,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum),
       (SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{{}}')
        FROM jsonb_array_elements_text(coalesce(nullif(to_jsonb(con) -> 'confdelsetcols', 'null'), '[]')) x
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = x::int2)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
  AND con.confrelid IN (SELECT %(relid)s::oid UNION SELECT relid FROM pg_partition_ancestors(%(relid)s::oid))
ORDER BY con.conname, con.oid

-- name: row_key_of
-- What tells a table's rows apart for the archive: its primary key, else its narrowest unique index (not
-- partial, no expression) whose columns are all NOT NULL.
SELECT u.cols
FROM (
    SELECT i.indisprimary AS is_primary, ci.relname AS name, array_agg(a.attname::text ORDER BY k.ord) AS cols,
           bool_and(a.attnotnull) AS not_null
    FROM pg_index i
    JOIN pg_class ci ON ci.oid = i.indexrelid
    CROSS JOIN LATERAL unnest((string_to_array(i.indkey::text, ' ')::int2[])[1:i.indnkeyatts])
        WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = %(relid)s AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
    GROUP BY i.indexrelid, i.indisprimary, ci.relname
) u
WHERE u.not_null
ORDER BY u.is_primary DESC, cardinality(u.cols), u.name
LIMIT 1

-- name: rel_privileges
-- Reading a reached table's rows, and locking them (SELECT ... FOR UPDATE needs UPDATE on some column). The
-- referential actions themselves run as the owner of each referencing table, so the cascade needs no DELETE
-- or UPDATE of ours beyond the orphan's own table.
SELECT has_schema_privilege(c.relnamespace, 'USAGE'), has_table_privilege(c.oid, 'SELECT'),
       has_any_column_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE')
FROM pg_class c WHERE c.oid = %(relid)s

-- name: orphan_rows
-- The batch's orphans, each still an orphan now, whole: its row key and every column as jsonb (text, so no
-- value passes through a float on its way to the archive), and the partition it lives in.
SELECT ({root_key_json})::text, to_jsonb(c)::text, c.tableoid::oid
FROM {table} c
JOIN {batch_keys} ON {c_is_batch_key}
WHERE {c_key_checked}
  AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
ORDER BY {c_row_key}
{lock}

-- name: reached_rows
-- The rows of {child} that one foreign key ties to the given rows of {parent} (whole rows, as jsonb): the
-- parent's referenced columns are read back typed from its jsonb (jsonb_populate_record), so any type of key
-- joins as the key itself does.
SELECT ({c_key_json})::text, to_jsonb(c)::text, c.tableoid::oid, j.parent_no
FROM jsonb_array_elements(%(parents)s::jsonb) WITH ORDINALITY AS j(parent_row, parent_no)
CROSS JOIN LATERAL jsonb_populate_record(NULL::{parent}, j.parent_row) AS p
JOIN {child} c ON {c_references_p}
ORDER BY {c_row_key}
{lock}

-- name: create_archive
-- One row per row a delete removed ("deleted", the orphan at depth 0, what the database's CASCADE keys took
-- with it below) and per pointer its SET NULL / SET DEFAULT keys changed ("nulled" / "reset", once per key):
-- the whole row before the change as jsonb, its table (and the partition: relid), its row key, the foreign key
-- that reached it (via), the columns changed. batch is the transaction's id, so the rows of one delete read
-- together; seq is the order they were found in (parents before children).
CREATE TABLE IF NOT EXISTS {archive} (
    run_id       text        NOT NULL,
    batch        bigint      NOT NULL,
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    depth        int         NOT NULL,
    table_schema text        NOT NULL,
    table_name   text        NOT NULL,
    relid        oid         NOT NULL,
    row_key      jsonb       NOT NULL,
    action       text        NOT NULL CHECK (action IN ('deleted', 'nulled', 'reset')),
    via          text        NOT NULL,
    columns      text[]      NOT NULL,
    row_data     jsonb       NOT NULL,
    archived_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, batch, table_schema, table_name, row_key, action, via)
)

-- name: comment_archive
COMMENT ON TABLE {archive} IS 'kpi-fk-maintenance: every row an orphans: delete run removed and every pointer its cascade changed, whole, before the change; restore with the restore DAG'

-- name: archive_rows
-- The batch's rows, built by the walk as one jsonb array (row_key and row_data stay jsonb, exact).
WITH archived AS (
    INSERT INTO {archive} (run_id, batch, depth, table_schema, table_name, relid, row_key, action, via, columns,
                           row_data)
    SELECT %(run_id)s, %(batch)s, r.depth, r.table_schema, r.table_name, r.relid, r.row_key, r.action, r.via,
           r.columns, r.row_data
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(ord int, depth int, table_schema text, table_name text, relid oid,
                                                   row_key jsonb, action text, via text, columns text[],
                                                   row_data jsonb)
    ORDER BY r.depth, r.ord
    RETURNING 1
)
SELECT count(*) FROM archived

-- name: delete_orphans
-- Still an orphan, checked again by this statement's own snapshot: a parent the app put back while the batch
-- waited for a lock keeps its child (the count then differs from the archive, and the batch rolls back).
WITH gone AS (
    DELETE FROM {table} c
    USING jsonb_array_elements(%(keys)s::jsonb) AS j(k)
    CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, j.k) AS o
    WHERE {c_is_o} AND {c_key_checked}
      AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
    RETURNING 1
)
SELECT count(*) FROM gone

-- name: changed_in_transaction
-- What this transaction deleted and updated so far, per table (a partition's own), from the statistics of
-- the transaction itself: the cascade's work, counted by the server, to hold against the archive.
SELECT s.relid, s.schemaname::text || '.' || s.relname::text, s.n_tup_del, s.n_tup_upd
FROM pg_stat_xact_user_tables s
WHERE (s.n_tup_del > 0 OR s.n_tup_upd > 0) AND s.schemaname <> %(audit_schema)s

-- name: record_batch
INSERT INTO {nulling_transactions} (audit_table, run_id, xact)
VALUES (%(audit_name)s, %(run_id)s, pg_current_xact_id())
ON CONFLICT DO NOTHING

-- name: batch_id
SELECT pg_current_xact_id()::text::bigint

-- name: archived_for_run
-- What a run's deletes removed and changed, per table and action, from the archive.
SELECT table_schema || '.' || table_name, action, count(*)
FROM {archive} WHERE run_id = %(run_id)s
GROUP BY 1, 2 ORDER BY 1, 2

-- name: archived_rows
-- Restore: the run's archived rows of the given actions, parents before children (depth, then the order they
-- were found in), a chunk at a time after the last one seen.
SELECT depth, seq, table_schema, table_name, row_key::text, action, via, columns, row_data::text
FROM {archive}
WHERE run_id = %(run_id)s AND action = ANY(%(actions)s) AND ROW(depth, seq) > ROW(%(after_depth)s, %(after_seq)s)
ORDER BY depth, seq
LIMIT %(limit)s

-- name: archived_count
SELECT count(*) FROM {archive} WHERE run_id = %(run_id)s

-- name: run_batches
-- The low 32 bits of each transaction that deleted the run's rows: what a row its cascade changed has as xmin.
SELECT (x.xact::text::bigint %% 4294967296) FROM {nulling_transactions} x
WHERE x.audit_table = %(audit_name)s AND x.run_id = %(run_id)s

-- name: insertable_columns
-- The columns a restore writes: every column but generated ones, which the server computes again.
SELECT array_agg(a.attname::text ORDER BY a.attnum)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attgenerated = ''

-- name: current_row
-- The row of that key now: whether it is exactly the archived one, and whether this run's batch wrote it.
SELECT to_jsonb(t) = %(row)s::jsonb, t.xmin::text::bigint = ANY(%(xids)s::bigint[]), to_jsonb(t)::text
FROM {rel} t, jsonb_populate_record(NULL::{rel}, %(key)s::jsonb) k
WHERE {t_is_k}

-- name: parent_exists
-- The orphan's own parent, by the declared key (which may not exist in the catalog yet).
SELECT EXISTS (
    SELECT 1 FROM jsonb_populate_record(NULL::{table}, %(row)s::jsonb) c, {ref_table} p WHERE {parent_of_c}
)

-- name: insert_row
INSERT INTO {rel} ({columns}) OVERRIDING SYSTEM VALUE
SELECT {r_columns} FROM jsonb_populate_record(NULL::{rel}, %(row)s::jsonb) r

-- name: put_back_columns
UPDATE {rel} t SET {set_from_r}
FROM jsonb_populate_record(NULL::{rel}, %(row)s::jsonb) r
WHERE {t_is_r}

-- name: log_restored
INSERT INTO {restore_log} (restore_id, audit_table, run_id, row_key, parent, restored_at)
VALUES (%(restore_id)s, %(audit_name)s, %(run_id)s, %(row_key)s, %(what)s, clock_timestamp())

-- name: act_for_declared_key
-- What the declared key, not added yet, will do to the rows it reaches from a deleted row (SET NULL / SET
-- DEFAULT): done here, in the delete's transaction, as PostgreSQL will do it once the key exists.
WITH changed AS (
    UPDATE {table} c SET {set_columns}
    FROM jsonb_array_elements(%(keys)s::jsonb) AS j(k)
    CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, j.k) AS o
    WHERE {c_is_o}
    RETURNING 1
)
SELECT count(*) FROM changed
