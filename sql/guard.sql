-- fk-maintenance guard (fk_maintenance.cli.guard): what `drizzle-kit generate` writes for a new foreign key or
-- index, in the guarded form of app/drizzle/migrations/20261124075342_add_parent_kpi_fk.sql. drizzle-kit's
-- migrator runs every pending migration in one transaction, so a plain ADD FOREIGN KEY (which validates by
-- scanning the table) or CREATE INDEX holds a lock that stalls the app's writes to the table until commit.
-- Guarded, the statement runs only where its object is missing and the table is small; where the pipeline
-- already made it, nothing is read from the table and no lock is taken on it: the table's name is resolved as
-- the statement resolves it (the search path, unless qualified) by a regclass cast, which locks nothing, and
-- only the catalog is read. Where something is missing, the count stops at max_rows (a bounded read).
-- lock_timeout heads the file: what the migration still locks (a small table, a fresh database) it waits for at
-- most that long, so the app's writes never queue behind it for longer.
-- These are text for the app's migration files: composed with psycopg.sql and rendered without a connection.

-- name: lock_timeout
SET LOCAL lock_timeout = '2s';

-- name: has_key
has_key boolean := EXISTS (
	SELECT 1 FROM pg_constraint
	WHERE conrelid = {table}::regclass AND conname = {object_name} AND contype = 'f'
);

-- name: has_index
has_index boolean := EXISTS (
	SELECT 1 FROM pg_index JOIN pg_class ON pg_class.oid = pg_index.indexrelid
	WHERE pg_index.indrelid = {table}::regclass AND pg_class.relname = {object_name}
);

-- name: create_if_missing
IF NOT {flag} THEN
	{statement};
END IF;

-- name: guarded
DECLARE
{declarations}
BEGIN
	IF {present} THEN
		RETURN;
	END IF;
	IF (SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT {max_rows}) AS sample) >= {max_rows} THEN
		RAISE EXCEPTION USING MESSAGE = {message}, HINT = {hint};
	END IF;
{creations}
END
