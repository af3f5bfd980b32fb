-- The audit table: every pointer we null is written here first, in the same transaction. It lives in the
-- pipeline's own schema, where the app's schema tool (drizzle-kit push) never looks.

-- name: create_schema
-- IF NOT EXISTS: a concurrent first run of another key may create it between our check and this.
CREATE SCHEMA IF NOT EXISTS {audit_schema}

-- name: comment_schema
COMMENT ON SCHEMA {audit_schema} IS 'kpi-fk-maintenance: the pipeline''s own objects (audit tables); not the app''s'

-- name: move_legacy_table
-- An audit table an earlier version left in the app's schema moves, rows and all, in the catalog only.
ALTER TABLE {legacy_audit} SET SCHEMA {audit_schema}

-- name: merge_legacy_rows
-- Both exist (an earlier version ran after a newer one): the rows join the pipeline's table; on the same
-- (run_id, row key) the pipeline's own row, the newer, is kept.
WITH moved AS (
    INSERT INTO {audit} (run_id, {audit_row_key}, {audit_pointer}, nulled_at)
    SELECT run_id, {audit_row_key}, {audit_pointer}, nulled_at FROM {legacy_audit}
    ON CONFLICT (run_id, {audit_row_key}) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM moved

-- name: drop_legacy_table
DROP TABLE {legacy_audit}

-- name: count_rows
SELECT count(*) FROM {audit}

-- name: create_table
-- One row per nulled row: the run, the row's key (kpi_id, then kpi_id_2 ... for a composite row key) and the
-- old value of every column of the foreign key (old_parent_kpi_id, then old_parent_kpi_id_2 ...), typed as the
-- app's columns; each column's comment names the app's column it copies.
CREATE TABLE IF NOT EXISTS {audit} (
    run_id            text        NOT NULL,
    {audit_column_definitions},
    nulled_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, {audit_row_key})
)

-- name: comment_column
COMMENT ON COLUMN {audit_column} IS {comment}

-- name: comment_table
COMMENT ON TABLE {audit} IS 'kpi-fk-maintenance: dangling parent pointers nulled before adding a foreign key; restore with the restore DAG or fk-maintenance restore'

-- name: create_nulling_transactions
-- The transactions that nulled each run's pointers (one row per batch), shared by every audit table of the
-- schema like the restore log. xid8 never wraps around; a row's xmin is its low 32 bits.
CREATE TABLE IF NOT EXISTS {nulling_transactions} (
    audit_table text        NOT NULL,
    run_id      text        NOT NULL,
    xact        xid8        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (audit_table, run_id, xact)
)

-- name: comment_nulling_transactions
COMMENT ON TABLE {nulling_transactions} IS 'kpi-fk-maintenance: the transactions that nulled each run''s pointers; restore puts a pointer back only where the row is still the version one of them wrote'
