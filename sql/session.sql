-- Session settings and the run lock. Settings go through set_config() so values are bound parameters.

-- name: configure
SELECT set_config('application_name', %(application_name)s, false),
       set_config('lock_timeout', %(lock_timeout)s, false),
       set_config('statement_timeout', %(statement_timeout)s, false),
       set_config('idle_in_transaction_session_timeout', %(idle_in_transaction_session_timeout)s, false),
       set_config('default_transaction_read_only', %(read_only)s, false)

-- name: limit_parallel_workers
SELECT set_config('max_parallel_workers_per_gather', %(per_gather)s, false),
       set_config('max_parallel_maintenance_workers', %(maintenance)s, false)

-- name: parallel_facts
-- What the server allows a statement of ours and how busy it is (fk_maintenance.db.parallelism). Busy: another
-- session (any database: the cores are the server's) running a statement now or within the last
-- busy_within_ms, or one of another role whose state we may not read (pg_read_all_stats shows it). The run's
-- own other sessions count too: a step running beside this one (the graph's other branch) takes a core as well.
SELECT current_setting('max_parallel_workers_per_gather')::int,
       current_setting('max_parallel_maintenance_workers')::int,
       current_setting('max_parallel_workers')::int,
       current_setting('max_worker_processes')::int,
       (SELECT source NOT IN ('default', 'override') FROM pg_settings WHERE name = 'max_parallel_workers'),
       count(*) FILTER (WHERE a.backend_type = 'parallel worker'),
       count(*) FILTER (WHERE a.backend_type IN ('client backend', 'autovacuum worker')
                        AND (a.state IS NULL OR a.state = 'active'
                             OR a.state_change > clock_timestamp() - make_interval(secs => %(busy_within_ms)s / 1000.0))),
       count(*) FILTER (WHERE a.backend_type = 'client backend' AND a.state IS NULL)
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid()

-- name: backend_start_epoch
SELECT extract(epoch FROM backend_start) FROM pg_stat_activity WHERE pid = pg_backend_pid()

-- name: check_client_connection
-- PostgreSQL 14+: while a long statement runs, notice within seconds that the worker died and roll back,
-- instead of holding our locks until the statement ends.
SELECT set_config('client_connection_check_interval', %(interval)s, false)
WHERE current_setting('server_version_num')::int >= 140000

-- name: current_settings
-- What to put back when a step ends: a value the session itself had set, or else a RESET to the role's,
-- database's or server's own. A setting this server version does not have is not listed.
SELECT s.name, current_setting(s.name), s.source = 'session'
FROM pg_settings s WHERE s.name = ANY(%(names)s::text[])

-- name: restore_settings
SELECT count(set_config(n, v, false)) FROM unnest(%(names)s::text[], %(values)s::text[]) AS s(n, v)

-- name: reset_setting
RESET {setting}

-- name: configure_local
SELECT set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true)

-- name: try_run_lock
SELECT pg_try_advisory_lock(hashtextextended(%(name)s, 0))

-- name: release_run_lock
SELECT pg_advisory_unlock(hashtextextended(%(name)s, 0))

-- name: run_lock_holder
WITH k AS (SELECT hashtextextended(%(name)s, 0) AS key)
SELECT a.pid, a.application_name, a.backend_start
FROM k, pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = (k.key >> 32) & 4294967295
  AND l.objid::bigint = k.key & 4294967295
  AND l.objsubid = 1
LIMIT 1

-- name: lock_holders
-- Who holds (or waits for) locks on the key's tables (the referencing and the referenced one: ADD FOREIGN KEY
-- locks both), for the operator. With modes: only granted locks of those modes, the ones an ALTER of ours would
-- queue behind (making every later app statement on that table queue behind it). Polled every few tens of
-- milliseconds while waiting for a free moment, so it reads pg_locks for these relations (and their partitions)
-- only. Names are matched exactly.
SELECT l.pid, l.mode, l.granted, coalesce(a.state, '?'),
       extract(epoch FROM now() - a.xact_start) * 1000,
       left(regexp_replace(coalesce(a.query, ''), '\s+', ' ', 'g'), 120),
       l.relation::regclass::text
FROM pg_locks l
JOIN (SELECT part.relid AS oid
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN unnest(%(schemas)s::text[], %(tables)s::text[]) AS want(schema_name, table_name)
        ON want.schema_name = n.nspname AND want.table_name = c.relname
      -- A partitioned table's partitions are locked with it: an app transaction on one of them conflicts too
      -- (pg_partition_tree lists nothing for a table that is not partitioned).
      -- Not for a statement that locks the parent alone (trees false).
      CROSS JOIN LATERAL (SELECT c.oid AS relid
                          UNION SELECT relid FROM pg_partition_tree(c.oid) WHERE %(trees)s) AS part) t
        ON t.oid = l.relation
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid IS DISTINCT FROM pg_backend_pid()
  -- An autovacuum yields to a waiting lock request, but not one that prevents wraparound; a prepared
  -- transaction (no pid, no backend) never yields.
  AND (%(modes)s::text[] IS NULL OR (
        l.granted AND l.mode = ANY(%(modes)s::text[])
        AND NOT (a.backend_type IS NOT DISTINCT FROM 'autovacuum worker'
                 AND a.query NOT LIKE '%%(to prevent wraparound)%%')))
ORDER BY l.granted DESC, a.xact_start NULLS LAST
LIMIT %(limit)s

-- name: server_pid
SELECT pg_backend_pid()

-- name: server_facts
SELECT current_setting('server_version'), current_setting('server_version_num')::int,
       current_database(), current_user, pg_is_in_recovery()
