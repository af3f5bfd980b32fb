-- Who may write the pipeline's record (its audit, archive, nulling-transactions and restore-log tables in its own
-- schema): restore trusts those rows, so only the pipeline's role should change them. Tables the pipeline creates
-- are stripped of every write privilege but the owner's in the same transaction; preflight reads who else can
-- write them and warns, naming the statement that takes the right away.
--
-- "Write" is INSERT, UPDATE, DELETE, TRUNCATE and TRIGGER (a trigger of someone else's on our table runs inside
-- our transaction and can change the rows we write). "The pipeline's own" roles: the role it connects as and the
-- NOLOGIN roles it is a member of (a group that owns its objects); no one logs in as those, and their other
-- members are named. Superusers can write anything and are never named. Predefined roles (pg_*) are not named
-- themselves; their members are (pg_write_all_data writes every table).

-- name: write_grantees
-- Roles other than the owner that hold a write privilege on a table (default privileges give them at CREATE).
SELECT DISTINCT r.rolname::text
FROM pg_class c
CROSS JOIN LATERAL aclexplode(c.relacl) a
JOIN pg_roles r ON r.oid = a.grantee
WHERE c.oid = %(relid)s AND a.grantee <> c.relowner AND a.privilege_type = ANY(%(writes)s)
ORDER BY 1

-- name: revoke_writes
REVOKE INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON {table} FROM {grantees}

-- name: create_grantees
-- Roles other than the owner that may create in a schema (default privileges on schemas give them at CREATE).
SELECT DISTINCT r.rolname::text
FROM pg_namespace n
CROSS JOIN LATERAL aclexplode(n.nspacl) a
JOIN pg_roles r ON r.oid = a.grantee
WHERE n.nspname = %(schema)s AND a.grantee <> n.nspowner AND a.privilege_type = 'CREATE'
ORDER BY 1

-- name: revoke_create
REVOKE CREATE ON SCHEMA {schema} FROM {grantees}

-- name: record_tables
-- The pipeline's tables that exist, by exact name.
SELECT c.oid
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s) AND c.relkind IN ('r', 'p')
ORDER BY c.relname

-- name: table_writers
-- Who besides the pipeline's own roles can change a table's rows, one row per (table, how, the role that holds the
-- right, the role that can use it): "public" (a grant to PUBLIC: every role), "granted" (a write privilege on the
-- table or one of its columns), "owner" (the owner may do anything to its table), "predefined" (the member of
-- pg_write_all_data); PUBLIC is NULL. The role that can use it is the holder itself, or a role that acts as the holder: inherits
-- its rights or may SET ROLE to it (%(acts)s: 'USAGE, SET' from PostgreSQL 16, 'MEMBER' before).
WITH RECURSIVE ours(oid) AS (
    SELECT oid FROM pg_roles WHERE rolname = current_user
    UNION
    SELECT m.roleid
    FROM pg_auth_members m
    JOIN ours o ON m.member = o.oid
    JOIN pg_roles g ON g.oid = m.roleid AND NOT g.rolcanlogin
), rels AS (
    SELECT c.oid, format('%%I.%%I', n.nspname, c.relname) AS name, c.relowner, c.relacl
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = ANY(%(relids)s::oid[])
), grants AS (
    SELECT rels.oid, a.grantee, a.privilege_type
    FROM rels CROSS JOIN LATERAL aclexplode(rels.relacl) a
    WHERE a.privilege_type = ANY(%(writes)s)
    UNION
    SELECT rels.oid, a.grantee, a.privilege_type
    FROM rels
    JOIN pg_attribute att ON att.attrelid = rels.oid AND att.attnum > 0 AND att.attacl IS NOT NULL
    CROSS JOIN LATERAL aclexplode(att.attacl) a
    WHERE a.privilege_type = ANY(%(writes)s)
), holders AS (
    SELECT rels.oid, rels.relowner AS holder, 'owner' AS how, NULL::text[] AS privileges FROM rels
    UNION ALL
    SELECT g.oid, g.grantee, 'granted', array_agg(DISTINCT g.privilege_type::text ORDER BY g.privilege_type::text)
    FROM grants g JOIN rels ON rels.oid = g.oid
    WHERE g.grantee <> 0 AND g.grantee <> rels.relowner
    GROUP BY g.oid, g.grantee
    UNION ALL
    SELECT rels.oid, to_regrole('pg_write_all_data')::oid, 'predefined', NULL
    FROM rels WHERE to_regrole('pg_write_all_data') IS NOT NULL
)
SELECT rels.name, h.how, holder.rolname::text, r.rolname::text, h.privileges,
       r.oid = h.holder OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid AND m.roleid = h.holder)
FROM holders h
JOIN rels ON rels.oid = h.oid
JOIN pg_roles holder ON holder.oid = h.holder
JOIN pg_roles r ON r.oid = h.holder OR pg_has_role(r.oid, h.holder, %(acts)s)
WHERE NOT r.rolsuper AND r.rolname !~ '^pg_' AND r.oid NOT IN (SELECT oid FROM ours)
UNION ALL
SELECT rels.name, 'public', NULL::text, NULL::text,
       array_agg(DISTINCT g.privilege_type::text ORDER BY g.privilege_type::text), true
FROM grants g JOIN rels ON rels.oid = g.oid
WHERE g.grantee = 0
GROUP BY rels.name
ORDER BY 1, 2, 4

-- name: schema_writers
-- Who besides the pipeline's own roles can replace the pipeline's tables through their schema: its owner (DROP
-- and CREATE of any table in it) and roles granted CREATE on it (a table created under a name the pipeline has
-- not used yet is taken as the pipeline's own, with its creator as owner), and the roles that act as them.
WITH RECURSIVE ours(oid) AS (
    SELECT oid FROM pg_roles WHERE rolname = current_user
    UNION
    SELECT m.roleid
    FROM pg_auth_members m
    JOIN ours o ON m.member = o.oid
    JOIN pg_roles g ON g.oid = m.roleid AND NOT g.rolcanlogin
), ns AS (
    SELECT n.oid, n.nspowner, n.nspacl FROM pg_namespace n WHERE n.nspname = %(schema)s
), holders AS (
    SELECT s.nspowner AS holder, 'owner' AS how FROM ns s
    UNION
    SELECT a.grantee, 'create'
    FROM ns s CROSS JOIN LATERAL aclexplode(s.nspacl) a
    WHERE a.privilege_type = 'CREATE' AND a.grantee <> s.nspowner AND a.grantee <> 0
)
SELECT h.how, holder.rolname::text, r.rolname::text,
       r.oid = h.holder OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid AND m.roleid = h.holder)
FROM holders h
JOIN pg_roles holder ON holder.oid = h.holder
JOIN pg_roles r ON r.oid = h.holder OR pg_has_role(r.oid, h.holder, %(acts)s)
WHERE NOT r.rolsuper AND r.rolname !~ '^pg_' AND r.oid NOT IN (SELECT oid FROM ours)
UNION ALL
SELECT 'public', NULL::text, NULL::text, true
FROM ns s CROSS JOIN LATERAL aclexplode(s.nspacl) a
WHERE a.privilege_type = 'CREATE' AND a.grantee = 0
ORDER BY 1, 3

-- name: default_writes
-- ALTER DEFAULT PRIVILEGES of the pipeline's role that give other roles (or PUBLIC) write privileges on the tables
-- it creates: in its schema, or in every schema (defaclnamespace 0). Whether the grant is per schema, the grantee
-- (NULL: PUBLIC), the privileges.
SELECT d.defaclnamespace <> 0, r.rolname::text,
       array_agg(DISTINCT a.privilege_type::text ORDER BY a.privilege_type::text)
FROM pg_default_acl d
CROSS JOIN LATERAL aclexplode(d.defaclacl) a
LEFT JOIN pg_roles r ON r.oid = a.grantee
WHERE d.defaclobjtype = 'r'
  AND d.defaclrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)
  AND (d.defaclnamespace = 0 OR d.defaclnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s))
  AND a.grantee <> d.defaclrole
  AND a.privilege_type = ANY(%(writes)s)
  AND NOT coalesce(r.rolsuper, false)
GROUP BY 1, 2
ORDER BY 1, 2
