-- The foreign key: added NOT VALID (no scan), validated later (one scan). The locks each takes and for how
-- long are listed once, in fk_maintenance/steps/registry.py.

-- name: add_not_valid
ALTER TABLE {table}
    ADD CONSTRAINT {constraint} FOREIGN KEY ({columns})
    REFERENCES {ref_table} ({ref_columns}) {key_definition}
    NOT VALID

-- name: rename_to_declared
-- A partition's own key equal to the declared one, under another name: under the declared name it is the key the
-- run looks for there (validated, then adopted by the parent's). ACCESS EXCLUSIVE on the partition for an
-- instant: under lock_timeout, in a free moment.
ALTER TABLE {partition} RENAME CONSTRAINT {existing} TO {constraint}

-- name: validate
ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}

-- name: lock_for_adoption
-- Before PostgreSQL 18 a partitioned parent cannot take a NOT VALID key: each partition gets one and
-- validates it, then the parent's ADD adopts them without a scan. Locked first (SHARE ROW EXCLUSIVE, what the
-- ADD takes on the parent and every partition anyway) so that no partition can be created or attached between
-- the check that every partition's key is valid and the ADD.
LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE

-- name: add_adopting
-- Only once every partition holds a VALID key of this definition: then it scans nothing, but it takes ACCESS
-- EXCLUSIVE on the referenced table (and, when that is partitioned, on both tables' partitions: measured in
-- devkit/partition_locks.md on 15, 16 and 18), blocking even the app's reads of it for its milliseconds: run
-- under lock_timeout, in a free moment. With one partition's key NOT VALID it would scan that partition under
-- that lock, which is why the caller checks them all inside the same transaction.
ALTER TABLE {table}
    ADD CONSTRAINT {constraint} FOREIGN KEY ({columns})
    REFERENCES {ref_table} ({ref_columns}) {key_definition}
