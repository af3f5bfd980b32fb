-- The foreign key: added NOT VALID (no scan), validated later (one scan). The locks each takes and for how
-- long are listed once, in fk_maintenance/steps.py.

-- name: add_not_valid
ALTER TABLE {table}
    ADD CONSTRAINT {constraint} FOREIGN KEY ({columns})
    REFERENCES {ref_table} ({ref_columns}) ON DELETE {on_delete}
    NOT VALID

-- name: validate
ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}
