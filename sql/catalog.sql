-- Catalog introspection for preflight and the steps. Names are bound values here, never identifiers.

-- name: table
SELECT c.oid, c.relkind::text, pg_total_relation_size(c.oid),
       greatest(c.reltuples, 0)::bigint, pg_get_userbyid(c.relowner)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(table)s

-- name: column
SELECT a.attnum, format_type(a.atttypid, a.atttypmod), a.atttypid::int, a.attnotnull
FROM pg_attribute a
WHERE a.attrelid = %(relid)s AND a.attname = %(column)s AND a.attnum > 0 AND NOT a.attisdropped

-- name: unique_on_columns
-- A foreign key needs a unique, non-partial, immediate (not DEFERRABLE) index on exactly the set of referenced
-- columns, in any order; the audit identifies a row by its row key, which needs the same.
SELECT count(*) > 0
FROM pg_index i
WHERE i.indrelid = %(relid)s AND i.indisunique AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL
  AND i.indexprs IS NULL AND i.indnkeyatts = cardinality(%(attnums)s::int2[])
  AND (SELECT array_agg(k ORDER BY k) FROM unnest((string_to_array(i.indkey::text, ' ')::int2[])[1:i.indnkeyatts]) k)
      = (SELECT array_agg(k ORDER BY k) FROM unnest(%(attnums)s::int2[]) k)

-- name: constraint_by_name
SELECT con.oid, con.convalidated, pg_get_constraintdef(con.oid)
FROM pg_constraint con
WHERE con.conrelid = %(relid)s AND con.conname = %(name)s

-- name: key_definitions
-- What a constraint is, every part of a foreign key's definition, columns by name (a partition's attnums may
-- differ from its parent's). confdelsetcols (the columns of ON DELETE SET NULL (...)) exists from PostgreSQL 15;
-- read through to_jsonb so the same query runs on 13 and 14, where it is absent.
SELECT con.oid, con.contype::text, con.confrelid, con.confdeltype::text, con.confupdtype::text,
       con.confmatchtype::text, con.condeferrable, con.condeferred,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM jsonb_array_elements_text(coalesce(nullif(to_jsonb(con) -> 'confdelsetcols', 'null'), '[]'))
             WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum::int2)
FROM pg_constraint con
WHERE con.oid = ANY(%(oids)s::oid[])

-- name: other_foreign_keys_on_columns
SELECT con.conname, pg_get_constraintdef(con.oid), con.convalidated
FROM pg_constraint con
WHERE con.conrelid = %(relid)s AND con.contype = 'f' AND con.conname <> %(name)s
  AND (SELECT array_agg(k ORDER BY k) FROM unnest(con.conkey) k)
      = (SELECT array_agg(k ORDER BY k) FROM unnest(%(attnums)s::int2[]) k)

-- name: partitioned_parent
-- A partitioned table whose partitions each hold the same key (fk-maintenance declare): its name, primary key,
-- whether a key column is nullable, its index leading with the key's columns (a partitioned one: the partitions'
-- are attached to it) and how many partitions it has.
SELECT n.nspname::text, c.relname::text,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = c.oid AND i.indisprimary),
       (SELECT bool_or(NOT a.attnotnull) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attname = ANY(%(columns)s::text[])),
       (SELECT ic.relname::text
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
        WHERE i.indrelid = c.oid AND am.amname = 'btree' AND NOT i.indisunique AND i.indpred IS NULL
          AND i.indexprs IS NULL AND i.indnatts = cardinality(%(columns)s::text[])
          AND (SELECT array_agg(a.attname::text ORDER BY k.ord)
               FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum) = %(columns)s::text[]
        ORDER BY ic.relname LIMIT 1),
       (SELECT count(*) FROM pg_inherits inh WHERE inh.inhparent = c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = %(oid)s

-- name: unattached_index_on_columns
-- A partition's own valid btree index on exactly the key's columns, in order, plain (as the run would build it)
-- and attached to no partitioned index: attaching it serves the key there without building a second one.
SELECT ci.relname::text
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
JOIN pg_am am ON am.oid = ci.relam
WHERE i.indrelid = %(relid)s AND am.amname = 'btree' AND i.indisvalid AND NOT i.indisunique
  AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnatts = cardinality(%(columns)s::text[])
  AND (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) = %(columns)s::text[]
  AND NOT EXISTS (SELECT 1 FROM pg_inherits inh WHERE inh.inhrelid = i.indexrelid)
ORDER BY ci.relname
LIMIT 1

-- name: own_foreign_keys_of_other_names
-- Foreign keys of the table or its partitions under names other than the key's, each its own (a key a
-- partition inherits from its parent's is that one's): those equal to the declared key would be a second one.
SELECT con.oid, con.conrelid, n.nspname::text, c.relname::text, con.conname::text
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.conrelid = ANY(%(relids)s::oid[]) AND con.contype = 'f' AND con.conname <> %(name)s
  AND con.conparentid = 0

-- name: same_columns_indexes
-- Other valid btree indexes that lead with the key's columns in the key's order (no expression or predicate; a
-- primary key's or a unique one's too): each serves the key's lookups as well as ours would, exact ones first.
SELECT ci.relname::text, pg_get_indexdef(i.indexrelid)
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
JOIN pg_am am ON am.oid = ci.relam
WHERE i.indrelid = %(relid)s AND am.amname = 'btree' AND i.indisvalid AND i.indpred IS NULL
  AND i.indexprs IS NULL AND i.indnkeyatts >= cardinality(%(attnums)s::int2[])
  AND (string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(%(attnums)s::int2[])] = %(attnums)s::int2[]
  AND ci.relname <> %(name)s
ORDER BY i.indnatts, ci.relname

-- name: relation_by_name
-- Index names share one namespace with tables, sequences and views.
SELECT c.oid, c.relkind::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s

-- name: index_by_oid
-- Its key columns by name (0, an expression, has none).
SELECT i.indrelid, am.amname::text, i.indisvalid, i.indisready, i.indisunique, i.indnatts, i.indnkeyatts,
       i.indexprs IS NOT NULL, i.indpred IS NOT NULL, pg_get_indexdef(i.indexrelid),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(string_to_array(i.indkey::text, ' ')::int2[]) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
JOIN pg_am am ON am.oid = ci.relam
WHERE i.indexrelid = %(oid)s

-- name: index_build_in_progress
SELECT p.pid, p.phase FROM pg_stat_progress_create_index p WHERE p.index_relid = %(oid)s

-- name: privileges
-- What the run needs on the two tables (the referencing c, the referenced r) and their schemas: ALTER TABLE and
-- CREATE INDEX need the owner's rights, CREATE INDEX also CREATE on the schema (even for the owner), ADD
-- FOREIGN KEY needs REFERENCES on the referenced table, the anti-join SELECT on both, and USAGE on both schemas.
SELECT pg_has_role(current_user, c.relowner, 'USAGE') AS owns_table,
       has_table_privilege(c.oid, 'SELECT') AS can_select,
       has_table_privilege(c.oid, 'UPDATE') AS can_update,
       has_schema_privilege(c.relnamespace, 'USAGE') AS can_use_schema,
       has_schema_privilege(c.relnamespace, 'CREATE') AS can_create_in_schema,
       has_table_privilege(r.oid, 'SELECT') AS can_select_referenced,
       has_schema_privilege(r.relnamespace, 'USAGE') AS can_use_referenced_schema,
       has_table_privilege(r.oid, 'REFERENCES') AS can_reference,
       (SELECT o.rolsuper FROM pg_roles o WHERE o.oid = c.relowner) AS owner_is_superuser,
       pg_has_role(current_user, c.relowner, 'MEMBER') AS member_of_owner
FROM pg_class c, pg_class r
WHERE c.oid = %(relid)s AND r.oid = %(ref_relid)s

-- name: schema_privileges
-- Whether the pipeline's schema exists, and what the role may do to create it or create in it.
SELECT n.oid IS NOT NULL,
       has_database_privilege(current_database(), 'CREATE'),
       n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'CREATE'),
       n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'USAGE')
FROM (SELECT 1) AS one
LEFT JOIN pg_namespace n ON n.nspname = %(schema)s

-- name: schema_exists
-- By its exact name: to_regnamespace() would parse the text as an identifier (case-folded, quotes and all).
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s)

-- name: owns_relation
SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = %(relid)s

-- name: audit_columns
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = %(relid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum

-- name: audit_primary_key
SELECT array_agg(a.attname::text ORDER BY k.ord)
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %(relid)s AND i.indisprimary

-- name: audit_privileges
SELECT has_table_privilege(%(relid)s, 'SELECT'), has_table_privilege(%(relid)s, 'INSERT'),
       has_table_privilege(%(relid)s, 'UPDATE')

-- name: wraparound_vacuum
-- The vacuum is found by the oid of the table it works on, never by its text; only its kind comes from the
-- query text, which is where PostgreSQL states it.
SELECT v.pid, left(a.query, 200), v.relid
FROM pg_stat_progress_vacuum v
JOIN pg_stat_activity a ON a.pid = v.pid
WHERE v.relid = ANY(%(relids)s::oid[])
  AND a.backend_type = 'autovacuum worker'
  AND a.query LIKE '%%(to prevent wraparound)%%'

-- name: active_sessions
SELECT count(*)
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend' AND a.state = 'active' AND a.pid <> pg_backend_pid()
  AND a.datname = current_database()

-- name: replica_lag
-- Replay lag of each streaming replica, seconds. A replica that has replayed everything lags 0 (replay_lag
-- keeps its last measure until the next write); one that is behind lags its replay_lag, or, before its
-- first report, the time since it last answered. NULL where this role may not see it (needs pg_monitor).
SELECT coalesce(nullif(r.application_name, ''), 'replica') || ' at ' || coalesce(host(r.client_addr), 'local socket'),
       CASE
           WHEN r.replay_lsn IS NULL THEN NULL
           WHEN pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn) <= 0 THEN 0
           ELSE coalesce(extract(epoch FROM r.replay_lag), extract(epoch FROM now() - r.reply_time), 0)
       END::float8
FROM pg_stat_replication r
WHERE NOT pg_is_in_recovery()
ORDER BY 2 DESC NULLS FIRST

-- name: quote_idents
-- Names as SQL would need them written (quoted only where needed), for messages that show a statement to run.
SELECT array_agg(quote_ident(x.name) ORDER BY x.i) FROM unnest(%(names)s::text[]) WITH ORDINALITY AS x(name, i)

-- name: partitions
-- Every partition below a partitioned table (all levels), with what the key has on each: the index attached
-- to ours (through pg_inherits, whatever its name: a partition created after ours was made got one named by
-- PostgreSQL) and the constraint of our name (its definition: key_definitions).
SELECT n.nspname::text, c.relname::text, c.oid, c.relkind::text, pt.level,
       pg_total_relation_size(c.oid), greatest(c.reltuples, 0)::bigint, pg_get_userbyid(c.relowner),
       attached.relname::text, coalesce(attached.indisvalid, false),
       con.oid IS NOT NULL, coalesce(con.convalidated, false), coalesce(con.conparentid <> 0, false), con.oid,
       -- CREATE INDEX on a partition needs CREATE on its schema, which may not be the parent's.
       has_schema_privilege(n.oid, 'CREATE')
FROM pg_partition_tree(%(relid)s::oid::regclass) pt
JOIN pg_class c ON c.oid = pt.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL (
    SELECT ci.relname, i.indisvalid
    FROM pg_inherits inh
    JOIN pg_index i ON i.indexrelid = inh.inhrelid
    JOIN pg_class ci ON ci.oid = i.indexrelid
    WHERE inh.inhparent = %(index_oid)s::oid AND i.indrelid = c.oid
) attached ON true
LEFT JOIN pg_constraint con ON con.conrelid = c.oid AND con.conname = %(constraint)s
WHERE pt.relid <> %(relid)s::oid::regclass
ORDER BY pt.level, c.relname

-- name: relation_name
SELECT n.nspname::text, c.relname::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = %(oid)s

-- name: is_partition
-- Whether a partition listed earlier is still below the table (the app may detach one meanwhile).
SELECT EXISTS (SELECT 1 FROM pg_partition_tree(%(relid)s::oid::regclass) WHERE relid = %(partition)s::oid::regclass)

-- name: declared_foreign_keys
-- Every foreign key a reference database declares (fk-maintenance declare), whole, columns by name in key order:
-- its definition's parts, the child's primary key (the row key), whether a column of the key is nullable, and
-- the first valid plain btree index whose leading columns are the key's (the index that serves it). Keys a
-- partition inherits from its parent are the parent's (conparentid); system schemas are left out.
SELECT con.conname::text, n.nspname::text, c.relname::text, rn.nspname::text, r.relname::text,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM jsonb_array_elements_text(coalesce(nullif(to_jsonb(con) -> 'confdelsetcols', 'null'), '[]'))
             WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum::int2),
       con.confdeltype::text, con.confupdtype::text, con.confmatchtype::text, con.condeferrable, con.condeferred,
       c.relispartition,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = c.oid AND i.indisprimary),
       (SELECT bool_or(NOT a.attnotnull) FROM pg_attribute a
        WHERE a.attrelid = con.conrelid AND a.attnum = ANY(con.conkey)),
       (SELECT ic.relname::text
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
        WHERE i.indrelid = c.oid AND am.amname = 'btree' AND i.indisvalid AND i.indpred IS NULL
          AND i.indexprs IS NULL
          AND (SELECT array_agg(k.attnum ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               WHERE k.ord <= cardinality(con.conkey)) = con.conkey::int2[]
        ORDER BY ic.relname LIMIT 1),
       (SELECT inh.inhparent FROM pg_inherits inh WHERE inh.inhrelid = c.oid AND c.relispartition)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class r ON r.oid = con.confrelid
JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_toast%%'
  AND (%(schemas)s::text[] IS NULL OR n.nspname = ANY(%(schemas)s::text[]))
ORDER BY n.nspname, c.relname, con.conname
