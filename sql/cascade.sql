-- orphans: delete. What deleting an orphan takes along, found from the catalog's own foreign keys, and the
-- archive that keeps every row and pointer a delete removes or changes, written in the delete's transaction.

-- name: referencing_keys
-- Every foreign key that references the relation, one of its ancestors (a partition's rows are theirs too) or
-- one of its own partitions (a key may reference a partition directly: it acts only on that partition's rows,
-- which the last column lists): its action on delete, the referencing table, the pairs of columns, and the
-- columns SET NULL (...) / SET DEFAULT (...) acts on (confdelsetcols, PostgreSQL 15+, read through to_jsonb so
-- the query runs where it is absent). Only the keys a user declared (conparentid = 0): a partitioned table's
-- clones per partition act as their parent does.
SELECT con.conname::text, con.confdeltype::text, n.nspname::text, c.relname::text, c.oid, c.relkind::text,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum),
       (SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{{}}')
        FROM jsonb_array_elements_text(coalesce(nullif(to_jsonb(con) -> 'confdelsetcols', 'null'), '[]')) x
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = x::int2),
       CASE WHEN con.confrelid = %(relid)s::oid
                 OR con.confrelid IN (SELECT relid FROM pg_partition_ancestors(%(relid)s::oid)) THEN NULL
            ELSE ARRAY(SELECT con.confrelid UNION SELECT t.relid::oid FROM pg_partition_tree(con.confrelid) t) END
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
  AND con.confrelid IN (SELECT %(relid)s::oid UNION SELECT relid FROM pg_partition_ancestors(%(relid)s::oid)
                        UNION SELECT relid FROM pg_partition_tree(%(relid)s::oid))
ORDER BY con.conname, con.oid

-- name: row_key_of
-- What tells a table's rows apart for the archive: its primary key, else its narrowest unique index (not
-- partial, no expression) whose columns are all NOT NULL; and their types (format_type), which read a row key
-- back typed without populating the rest of the row (a NOT NULL domain column would refuse that).
SELECT u.cols, u.types
FROM (
    SELECT i.indisprimary AS is_primary, ci.relname AS name, array_agg(a.attname::text ORDER BY k.ord) AS cols,
           array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) AS types,
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
-- value passes through a float on its way to the archive), the partition it lives in, the row's own text (every
-- value exactly, under the formats pin_formats fixes) and the version's xmin.
SELECT ({root_key_json})::text, to_jsonb(c)::text, c.tableoid::oid, c::text, c.xmin::text::bigint
FROM {table} c
JOIN {batch_keys} ON {c_is_batch_key}
WHERE {c_key_checked}
  AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
ORDER BY {c_row_key}
{lock}

-- name: reached_rows
-- The rows of {child} that one foreign key ties to the given rows of {parent} (whole rows, as jsonb): the
-- parent's referenced columns are read back typed from its jsonb (jsonb_populate_record), so any type of key
-- joins as the key itself does. Then the row's text and xmin (as orphan_rows), and for a SET NULL key the md5 of
-- the row's text as the key will leave it: what tells our version of the row after a table rewrite changed
-- every xmin.
SELECT ({c_key_json})::text, to_jsonb(c)::text, c.tableoid::oid, j.parent_no, c::text, c.xmin::text::bigint,
       {written}
FROM jsonb_array_elements(%(parents)s::jsonb) WITH ORDINALITY AS j(parent_row, parent_no)
CROSS JOIN LATERAL jsonb_populate_record(NULL::{parent}, j.parent_row) AS p
JOIN {child} c ON {c_references_p}
ORDER BY {c_row_key}
{lock}

-- name: create_archive
-- One row per row a delete removed ("deleted", the orphan at depth 0, what the database's CASCADE keys took
-- with it below) and per pointer its SET NULL / SET DEFAULT keys changed ("nulled" / "reset", once per key):
-- the whole row before the change as jsonb (row_data, to read by hand) and as its own text (row_text, every
-- value exactly: -0, json as written, array bounds), its table (and the partition: relid), its row key, the
-- foreign key that reached it (via), the columns changed. batch is the transaction's id, so the rows of one
-- delete read together; seq is the order they were found in (parents before children). What tells a restore
-- whether a row is still as the run left it: row_xmin (the archived version's xmin), filenode (the partition's
-- file then: a rewrite changes it, and every xmin with it), written_md5 (a SET NULL pointer: the md5 of the row's
-- text as the key left it) and prior_intact (an earlier batch of the run changed this row, and nobody wrote it
-- between: its values before the run are that batch's row).
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
    row_text     text,
    row_xmin     bigint,
    filenode     oid,
    written_md5  text,
    prior_intact boolean,
    PRIMARY KEY (run_id, batch, table_schema, table_name, row_key, action, via)
)

-- name: index_archive
-- Every record of one row in a run, in batch order: the delete reads the row's last earlier record, the
-- restore its whole story.
CREATE INDEX ON {archive} (run_id, table_schema, table_name, row_key, batch)

-- name: comment_archive
COMMENT ON TABLE {archive} IS 'kpi-fk-maintenance: every row an orphans: delete run removed and every pointer its cascade changed, whole, before the change; restore with the restore DAG'

-- name: archive_shape
-- Whether the archive has the columns a restore needs to be exact (an earlier version's archive has not), and
-- the index on each row's records; and whether the role owns it (the upgrade adds both).
SELECT EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = c.oid AND a.attname = 'prior_intact' AND NOT a.attisdropped),
       EXISTS (SELECT 1 FROM pg_index i
               WHERE i.indrelid = c.oid
                 AND (string_to_array(i.indkey::text, ' ')::int2[])[1:4] = ARRAY(
                     SELECT a.attnum FROM unnest(ARRAY['run_id', 'table_schema', 'table_name', 'row_key'])
                         WITH ORDINALITY AS n(name, ord)
                     JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = n.name ORDER BY n.ord)),
       pg_has_role(c.relowner, 'USAGE')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(table)s

-- name: upgrade_archive
-- An earlier version's archive: the columns that make a restore exact, empty for its rows (restored as before).
ALTER TABLE {archive}
    ADD COLUMN IF NOT EXISTS row_text text,
    ADD COLUMN IF NOT EXISTS row_xmin bigint,
    ADD COLUMN IF NOT EXISTS filenode oid,
    ADD COLUMN IF NOT EXISTS written_md5 text,
    ADD COLUMN IF NOT EXISTS prior_intact boolean

-- name: pin_formats
-- Every value's text fixed for this transaction, whatever the role's or database's settings: the archive's
-- row_text and row_data, and the restore reading them, then write and read the same text for the same value
-- (floats in full, timestamps in UTC, intervals, bytea, money and xml alike).
SELECT set_config('DateStyle', 'ISO, MDY', true), set_config('IntervalStyle', 'postgres', true),
       set_config('TimeZone', 'UTC', true), set_config('extra_float_digits', '3', true),
       set_config('bytea_output', 'hex', true), set_config('lc_monetary', 'C', true),
       set_config('xmloption', 'content', true)

-- name: archive_rows
-- The batch's rows, built by the walk as one jsonb array (row_key and row_data stay jsonb, exact), each with its
-- partition's file now and whether the run's previous record of the same row is the version this batch found:
-- that batch wrote it (its xmin) and nobody wrote it since. Only a row whose xmin is one of the run's earlier
-- batches can be, so only those look their record up (the gate is a one-time filter of the lookup).
WITH archived AS (
    INSERT INTO {archive} (run_id, batch, depth, table_schema, table_name, relid, row_key, action, via, columns,
                           row_data, row_text, row_xmin, filenode, written_md5, prior_intact)
    SELECT %(run_id)s, %(batch)s, r.depth, r.table_schema, r.table_name, r.relid, r.row_key, r.action, r.via,
           r.columns, r.row_data, r.row_text, r.row_xmin, pg_relation_filenode(r.relid), r.written_md5,
           coalesce(prior.action <> 'deleted' AND r.row_xmin = prior.batch %% 4294967296, false)
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(ord int, depth int, table_schema text, table_name text, relid oid,
                                                   row_key jsonb, action text, via text, columns text[],
                                                   row_data jsonb, row_text text, row_xmin bigint,
                                                   written_md5 text)
    LEFT JOIN LATERAL (
        SELECT a.batch, a.action FROM {archive} a
        WHERE r.row_xmin IN (SELECT x.xact::text::bigint %% 4294967296 FROM {nulling_transactions} x
                             WHERE x.audit_table = %(audit_name)s AND x.run_id = %(run_id)s)
          AND a.run_id = %(run_id)s AND a.table_schema = r.table_schema AND a.table_name = r.table_name
          AND a.row_key = r.row_key AND a.batch < %(batch)s
        ORDER BY a.batch DESC
        LIMIT 1
    ) prior ON true
    ORDER BY r.depth, r.ord
    RETURNING 1
)
SELECT count(*) FROM archived

-- name: delete_orphans
-- Still an orphan, checked again by this statement's own snapshot: a parent the app put back while the batch
-- waited for a lock keeps its child (the count then differs from the archive, and the batch rolls back). The
-- keys are read typed ({keys}), never as whole rows, which a NOT NULL domain column would refuse.
WITH gone AS (
    DELETE FROM {table} c
    USING {keys}
    WHERE {c_is_o} AND {c_key_checked}
      AND NOT EXISTS (SELECT 1 FROM {ref_table} p WHERE {parent_of_c})
    RETURNING 1
)
SELECT count(*) FROM gone

-- name: delete_taken
-- What the declared key (not added yet) takes along with the orphans (ON DELETE CASCADE): deleted by key, after
-- the orphans, with no check of its own (this statement's snapshot still sees the orphan each hangs from; the
-- server's counts hold the whole batch against the archive).
WITH gone AS (
    DELETE FROM {table} c USING {keys} WHERE {c_is_o} RETURNING 1
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

-- name: archived_count
SELECT count(*) FROM {archive} WHERE run_id = %(run_id)s

-- name: act_for_declared_key
-- What the declared key, not added yet, will do to the rows it reaches from a deleted row (SET NULL / SET
-- DEFAULT): done here, in the delete's transaction, as PostgreSQL will do it once the key exists.
WITH changed AS (
    UPDATE {table} c SET {set_columns}
    FROM {keys}
    WHERE {c_is_o}
    RETURNING 1
)
SELECT count(*) FROM changed

-- name: restore_blockers
-- What would keep a restore from putting a table's rows back exactly as they were: its triggers (on it or any
-- of its partitions, enabled, not the database's own) that an INSERT fires (BEFORE ones rewrite the row, AFTER
-- ones write elsewhere) or an UPDATE of the given columns fires, and its rules on INSERT / UPDATE. A trigger
-- whose function reads the setting fk_maintenance.restoring is taken to step aside while the restore writes.
SELECT format('trigger %%I on %%s (%%s %%s, FOR EACH %%s)', t.tgname, t.tgrelid::regclass,
              CASE WHEN t.tgtype & 2 <> 0 THEN 'BEFORE' ELSE 'AFTER' END,
              concat_ws(' OR ', CASE WHEN t.tgtype & 4 <> 0 THEN 'INSERT' END,
                                CASE WHEN t.tgtype & 16 <> 0 THEN 'UPDATE' END),
              CASE WHEN t.tgtype & 1 <> 0 THEN 'ROW' ELSE 'STATEMENT' END)
FROM pg_trigger t
JOIN pg_proc f ON f.oid = t.tgfoid
WHERE t.tgrelid IN (SELECT %(relid)s::oid UNION SELECT relid FROM pg_partition_tree(%(relid)s::oid))
  AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')
  AND ((%(inserts)s AND t.tgtype & 4 <> 0)
       OR (t.tgtype & 16 <> 0 AND cardinality(%(updates)s::text[]) > 0
           AND (cardinality(t.tgattr::int2[]) = 0
                OR t.tgattr::int2[] && ARRAY(SELECT a.attnum FROM pg_attribute a
                                             WHERE a.attrelid = t.tgrelid AND a.attname = ANY(%(updates)s)))))
  AND f.prosrc NOT LIKE '%%fk_maintenance.restoring%%'
UNION ALL
SELECT format('rule %%I on %%s (ON %%s)', r.rulename, r.ev_class::regclass,
              CASE r.ev_type WHEN '3' THEN 'INSERT' ELSE 'UPDATE' END)
FROM pg_rewrite r
WHERE r.ev_class IN (SELECT %(relid)s::oid UNION SELECT relid FROM pg_partition_tree(%(relid)s::oid))
  AND ((%(inserts)s AND r.ev_type = '3') OR (cardinality(%(updates)s::text[]) > 0 AND r.ev_type = '2'))
ORDER BY 1

-- name: inheritance_children
-- Tables that inherit from this one (not its partitions): the walk reads their rows through it, and a restore
-- would put them back in it, without the child's own columns.
SELECT coalesce(array_agg(i.inhrelid::regclass::text ORDER BY i.inhrelid::regclass::text), '{{}}')
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = %(relid)s::oid AND NOT c.relispartition

-- name: row_security
-- Row-level security that applies to this role on the table: the walk would not see every row the database's
-- own keys act on (referential actions do not apply it).
SELECT row_security_active(%(relid)s::oid)

-- name: deferrable_unique
-- A table's DEFERRABLE unique, primary-key or exclusion constraints: a restore's ON CONFLICT cannot take them as
-- its arbiters (55000), so rows of that table could not be put back.
SELECT conname::text FROM pg_constraint
WHERE conrelid = %(relid)s AND contype IN ('p', 'u', 'x') AND condeferrable
ORDER BY 1
