-- The foreign key: added NOT VALID (a short SHARE ROW EXCLUSIVE lock, no scan), validated later
-- (SHARE UPDATE EXCLUSIVE, which app reads and writes do not conflict with, plus one scan).

-- name: add_not_valid
ALTER TABLE {table}
    ADD CONSTRAINT {constraint} FOREIGN KEY ({column})
    REFERENCES {ref_table} ({ref_column}) ON DELETE {on_delete}
    NOT VALID

-- name: validate
ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}
