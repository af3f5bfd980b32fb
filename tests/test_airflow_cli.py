"""The command an operator runs: ``airflow dags test vision_kpis_parent_fk -c '{"validate_now": true}'``,
in a separate process, on a table of the app's shape that the other tests never build; then the same command
with ``conn_ids`` over that database and two broken ones."""

from __future__ import annotations

import json

import psycopg
import pytest

from devkit.airflow_env import DAG_ID, airflow_cli, latest_xcom

UNSEEN_SHAPE = """
CREATE TABLE public.vision_kpis (
    id             uuid PRIMARY KEY,
    user_id        uuid NOT NULL,
    vision_id      uuid NOT NULL,
    level          text NOT NULL,
    title          text NOT NULL,
    target_value   numeric(12, 2),
    unit           text DEFAULT 'count',
    metadata       jsonb NOT NULL DEFAULT '{}',
    parent_kpi_id  uuid,
    archived_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vision_kpis_user_vision_idx ON public.vision_kpis (user_id, vision_id);
CREATE INDEX vision_kpis_level_idx ON public.vision_kpis (vision_id, level);
CREATE FUNCTION public.touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TRIGGER vision_kpis_touch BEFORE UPDATE ON public.vision_kpis
    FOR EACH ROW EXECUTE FUNCTION public.touch_updated_at();
-- 200 yearly roots, 4 children each; every 10th child points at one of 7 missing parents (shared).
INSERT INTO public.vision_kpis (id, user_id, vision_id, level, title, target_value, metadata, parent_kpi_id)
SELECT md5('root' || g)::uuid, md5('u' || g % 13)::uuid, md5('v' || g)::uuid, 'yearly', 'Root ' || g,
       g * 1.5, jsonb_build_object('n', g), NULL
FROM generate_series(1, 200) g;
INSERT INTO public.vision_kpis (id, user_id, vision_id, level, title, target_value, metadata, parent_kpi_id)
SELECT md5('child' || g)::uuid, md5('u' || g % 13)::uuid, md5('v' || g / 4)::uuid, 'quarterly', 'Child ' || g,
       NULL, '{}',
       CASE WHEN g % 10 = 0 THEN md5('gone' || g % 7)::uuid ELSE md5('root' || (g / 4 + 1))::uuid END
FROM generate_series(0, 799) g;
"""


def _rows_except_parent(db) -> dict:
    return {
        row[0]: row[1:]
        for row in db.query(
            "SELECT id, user_id, vision_id, level, title, target_value, unit, metadata, archived_at, "
            "created_at, updated_at FROM vision_kpis"
        )
    }


def test_airflow_dags_test_converges_an_unseen_table_shape_then_a_fleet_run_changes_it_no_more_and_names_the_broken(
    db, pg_server, airflow_home
) -> None:
    db.execute(UNSEEN_SHAPE)
    db.execute("ANALYZE vision_kpis")
    # A concurrent build that failed midway leaves an INVALID index of our name.
    with db.connect() as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY vision_kpis_parent_kpi_idx ON vision_kpis (user_id)")
    assert db.scalar("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 'vision_kpis_parent_kpi_idx'::regclass")
    pointers_before = dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
    others_before = _rows_except_parent(db)
    conf = json.dumps({"validate_now": True})
    conn_json = db.server.airflow_connection_json(db.name)

    first = airflow_cli(airflow_home, "dags", "test", DAG_ID, "-c", conf, kpi_db_json=conn_json, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = latest_xcom(airflow_home, "canary.report")
    assert report["final_state"] == "converged"
    assert report["orphans_found"] == 80 and report["dangling_parents"] == 7
    assert report["steps"]["create_index_concurrently"]["outcome"] == "rebuilt (dropped INVALID leftover)"

    pointers_after = dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
    nulled = {k: v for k, v in pointers_before.items() if pointers_after[k] != v}
    audit = dict(db.query("SELECT kpi_id, old_parent_kpi_id FROM fk_maintenance.vision_kpis_orphan_audit"))
    assert audit == nulled and len(nulled) == 80
    assert all(pointers_after[k] is None for k in nulled)
    others_after = _rows_except_parent(db)
    assert others_after.keys() == others_before.keys()
    # Only the nulled rows changed, and only their pointer (and updated_at, stamped by the app's own trigger).
    assert {k: v for k, v in others_after.items() if k not in nulled} == {
        k: v for k, v in others_before.items() if k not in nulled
    }
    assert all(others_after[k][:-1] == others_before[k][:-1] for k in nulled)

    # The same command over a fleet: the converged database first (the canary), then a database whose index of
    # our name is on another column, and one whose server does not answer.
    conflicting = pg_server.create_database()
    try:
        with psycopg.connect(pg_server.dsn(conflicting), autocommit=True) as conn:
            conn.execute(UNSEEN_SHAPE)
            conn.execute("CREATE INDEX vision_kpis_parent_kpi_idx ON vision_kpis (user_id)")
            conflicting_before = conn.execute("SELECT id, parent_kpi_id FROM vision_kpis ORDER BY id").fetchall()
        connections = {
            "tenant_conflict": pg_server.airflow_connection_json(conflicting),
            "tenant_down": json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 1, "login": "app"}),
        }
        state = _rows_except_parent(db), dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))
        fleet_conf = json.dumps({"conn_ids": ["kpi_db", *connections], "validate_now": True})
        second = airflow_cli(
            airflow_home,
            "dags",
            "test",
            DAG_ID,
            "-c",
            fleet_conf,
            kpi_db_json=conn_json,
            connections=connections,
            check=False,
        )
        assert second.returncode != 0  # two targets failed, so the run did
        assert (_rows_except_parent(db), dict(db.query("SELECT id, parent_kpi_id FROM vision_kpis"))) == state
        report = latest_xcom(airflow_home, "canary.report")
        assert report["nulled"] == 0 and report["final_state"] == "converged"
        assert db.scalar("SELECT count(*) FROM fk_maintenance.vision_kpis_orphan_audit") == 80
        fleet = latest_xcom(airflow_home, "fleet_report", key="report")
        states = {t["conn_id"]: (t["final_state"], t["error"]) for t in fleet["targets"]}
        assert states["kpi_db"] == ("converged", None)
        assert states["tenant_conflict"][0] == "failed at preflight"
        assert "index vision_kpis_parent_kpi_idx already exists with another definition" in states["tenant_conflict"][1]
        assert states["tenant_down"][0] == "failed at preflight"
        assert "cannot connect to the target database (Airflow connection 'tenant_down'" in states["tenant_down"][1]
        with psycopg.connect(pg_server.dsn(conflicting)) as conn:
            assert (
                conn.execute("SELECT id, parent_kpi_id FROM vision_kpis ORDER BY id").fetchall() == conflicting_before
            )
    finally:
        pg_server.drop_database(conflicting)
