"""Declared targets: the shipped file, bad files refused as one clear error, and one converging DAG per key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fk_maintenance.keys.spec import VISION_KPIS_PARENT_FK
from fk_maintenance.keys.targets import TargetsFileInvalid, load_targets

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "dags" / "targets.yaml"


def test_a_composite_key_across_schemas_is_declared_with_lists_and_a_referenced_schema(tmp_path):
    path = tmp_path / "targets.yaml"
    path.write_text(
        "foreign_keys:\n"
        "  - {name: nodes_fk, schema: Tenancy, table: Nodes, columns: [tenant_id, parent_id], ref_schema: Core,\n"
        "     ref_table: Nodes, ref_columns: [tenant_id, id], row_key: [tenant_id, id],\n"
        "     on_delete: 'set null (parent_id)', constraint: c, index: i, audit_table: a, conn_ids: [db]}\n"
        "  - {name: one_fk, table: t, column: p, ref_table: t, ref_column: k, constraint: c2, index: i2,\n"
        "     audit_table: a2, conn_ids: [db]}\n"
    )
    composite, single = (target.spec for target in load_targets(path))
    assert composite.pairs == (("tenant_id", "tenant_id"), ("parent_id", "id"))
    assert (composite.ref_schema, composite.row_key) == ("Core", ("tenant_id", "id"))
    assert (composite.on_delete, composite.on_delete_columns) == ("SET NULL", ("parent_id",))
    assert not composite.self_referential  # the same table name in another schema is another table
    assert composite.tables == (("Tenancy", "Nodes"), ("Core", "Nodes"))
    assert composite.audit_pointer_columns == ("old_parent_kpi_id", "old_parent_kpi_id_2")
    # One column is a list of one; the row key of a self-reference defaults to the referenced columns.
    assert (single.columns, single.ref_columns, single.row_key, single.ref_schema) == (("p",), ("k",), ("k",), "public")


def test_on_update_match_and_deferrability_are_declared_whole_with_the_defaults_postgresql_has(tmp_path):
    path = tmp_path / "targets.yaml"
    path.write_text(
        "foreign_keys:\n"
        "  - {name: lines_fk, table: lines, columns: [tenant_id, order_no], ref_table: orders,\n"
        "     ref_columns: [tenant_id, order_no], row_key: id, on_delete: restrict, on_update: cascade,\n"
        "     match: full, deferrable: initially deferred, constraint: c, index: i, audit_table: a, conn_ids: [db]}\n"
        "  - {name: plain_fk, table: t, column: p, ref_table: t, ref_column: k, deferrable: true,\n"
        "     constraint: c2, index: i2, audit_table: a2, conn_ids: [db]}\n"
    )
    declared, plain = (target.spec for target in load_targets(path))
    assert (declared.on_delete, declared.on_update, declared.match) == ("RESTRICT", "CASCADE", "FULL")
    assert (declared.deferrable, declared.initially_deferred) == (True, True)
    assert declared.definition_sql == "MATCH FULL ON UPDATE CASCADE ON DELETE RESTRICT DEFERRABLE INITIALLY DEFERRED"
    assert (plain.on_update, plain.match, plain.deferrable, plain.initially_deferred) == (
        "NO ACTION",
        "SIMPLE",
        True,
        False,
    )
    assert plain.definition_sql == "ON DELETE SET NULL DEFERRABLE INITIALLY IMMEDIATE"


def test_the_shipped_file_declares_exactly_todays_key():
    (target,) = load_targets(SHIPPED)
    assert (
        target.name == "vision_kpis_parent_fk"
        and target.spec == VISION_KPIS_PARENT_FK
        and target.conn_ids == ("kpi_db",)
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("    index:", "    indx:"), "unknown key(s) 'indx'"),
        (lambda t: t + t.split("foreign_keys:\n")[1], "declared more than once"),
        (lambda t: t.replace("constraint: vision_kpis_parent_kpi_id_fkey", "constraint: " + "x" * 70), "is too long"),
        (lambda t: t.replace("on_delete: SET NULL", "on_delete: DROP"), "'DROP' is not one of"),
        (lambda t: t.replace("name: vision_kpis_parent_fk", "name: bad name"), "does not match"),
        (
            # A second key of another table that reuses the first one's audit table (and its index name).
            lambda t: (
                t
                + t.split("foreign_keys:\n")[1]
                .replace("name: vision_kpis_parent_fk", "name: goals_fk")
                .replace("table: vision_kpis\n", "table: goals\n")
                .replace("ref_table: vision_kpis", "ref_table: goals")
            ),
            "each key needs its own: audit table fk_maintenance.vision_kpis_orphan_audit is declared by "
            "'vision_kpis_parent_fk', 'goals_fk'; index public.vision_kpis_parent_kpi_idx is declared by",
        ),
        (
            lambda t: t.replace("ref_table: vision_kpis", "ref_table: goals"),
            "hierarchy_checks needs a self-referencing key",
        ),
        (
            lambda t: t.replace(
                "    column: parent_kpi_id\n", "    column: parent_kpi_id\n    columns: [parent_kpi_id]\n"
            ),
            "declare exactly one of 'column' (a name) or 'columns' (a list), not ['column', 'columns']",
        ),
        (
            lambda t: t.replace("    ref_column: id\n", ""),
            "declare exactly one of 'ref_column' (a name) or 'ref_columns' (a list), not neither",
        ),
        (
            lambda t: t.replace("    column: parent_kpi_id\n", "    columns: [user_id, parent_kpi_id]\n"),
            "columns ['user_id', 'parent_kpi_id'] and ref_columns ['id'] differ in length",
        ),
        (
            lambda t: t.replace("on_delete: SET NULL", "on_delete: SET NULL (user_id)"),
            "on_delete lists ['user_id'], which are not among the key's columns ['parent_kpi_id']",
        ),
        (
            lambda t: t.replace("on_delete: SET NULL", "on_delete: CASCADE (parent_kpi_id)"),
            "on_delete 'CASCADE (parent_kpi_id)' is not one of",
        ),
        (
            lambda t: t.replace("    row_key: id\n", "    row_key: [id, id]\n"),
            "row_key ['id', 'id'] names a column twice",
        ),
        (
            lambda t: t.replace("on_delete: SET NULL", "on_delete: SET NULL\n    on_update: SET NULL (parent_kpi_id)"),
            "on_update: 'SET NULL (parent_kpi_id)' is not one of ['CASCADE', 'NO ACTION', 'RESTRICT', 'SET DEFAULT'",
        ),
        (
            lambda t: t.replace("on_delete: SET NULL", "on_delete: SET NULL\n    match: partial"),
            "match: 'partial' is not one of ['FULL', 'SIMPLE'] (PostgreSQL does not implement MATCH PARTIAL)",
        ),
        (
            lambda t: t.replace("on_delete: SET NULL", "on_delete: SET NULL\n    deferrable: later"),
            "deferrable: 'later' is not one of false, true or 'initially deferred'",
        ),
    ],
)
def test_a_bad_file_is_one_error_naming_the_file_and_the_entry(tmp_path, edit, message):
    path = tmp_path / "targets.yaml"
    path.write_text(edit(SHIPPED.read_text()))
    with pytest.raises(TargetsFileInvalid) as caught:
        load_targets(path)
    assert str(path) in str(caught.value) and message in str(caught.value), str(caught.value)


GOALS_KEY = """
  - name: goals_parent_fk
    table: goals
    column: parent_id
    ref_table: goals
    ref_column: id
    constraint: goals_parent_id_fkey
    index: goals_parent_id_idx
    audit_table: goals_orphan_audit
    conn_ids: [kpi_db]
"""


def _bag(monkeypatch, targets: Path):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("FK_MAINTENANCE_TARGETS", str(targets))
    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("on_delete: SET NULL", "on_delete: SET NOTHING"), "'SET NOTHING' is not one of"),
        (lambda t: t.replace("conn_ids: [kpi_db]", "conn_ids: [kpi_db, kpi_db]"), "has non-unique elements"),
    ],
)
def test_a_bad_targets_file_is_an_import_error_naming_it_and_no_dag_of_it_loads(
    monkeypatch, tmp_path, airflow_home, edit, message
) -> None:
    bad = tmp_path / "targets.yaml"
    bad.write_text(edit(SHIPPED.read_text()) + GOALS_KEY)
    bag = _bag(monkeypatch, bad)
    assert bag.dag_ids == []
    ((_, error),) = bag.import_errors.items()
    assert str(bad) in error and message in error


def test_a_key_declared_for_several_connections_offers_them_all_in_order_on_its_form(
    monkeypatch, tmp_path, airflow_home
) -> None:
    targets = tmp_path / "targets.yaml"
    targets.write_text(SHIPPED.read_text().replace("conn_ids: [kpi_db]", "conn_ids: [kpi_db, kpi_db_eu, kpi_db_us]"))
    bag = _bag(monkeypatch, targets)
    assert bag.import_errors == {}
    for dag_id in ("vision_kpis_parent_fk", "vision_kpis_parent_fk_restore"):
        assert bag.dags[dag_id].params.get_param("conn_ids").value == ["kpi_db", "kpi_db_eu", "kpi_db_us"]


def test_two_declared_keys_give_two_dags_that_both_converge_and_one_dag_for_both(
    monkeypatch, tmp_path, airflow_home, db
) -> None:
    from devkit.db_state import orphan_count
    from fk_maintenance.keys.settings import SETTING_DEFS
    from fk_maintenance.keys.targets import load_targets

    targets = tmp_path / "targets.yaml"
    targets.write_text(SHIPPED.read_text() + GOALS_KEY)
    bag = _bag(monkeypatch, targets)
    assert bag.import_errors == {} and sorted(bag.dag_ids) == [
        "all_declared_keys",
        "goals_parent_fk",
        "goals_parent_fk_restore",
        "vision_kpis_parent_fk",
        "vision_kpis_parent_fk_restore",
    ]
    # The keys' tables are apart: they land side by side, each in its own lane.
    all_keys = bag.dags["all_declared_keys"]
    assert {task.task_id: task.upstream_task_ids for task in all_keys.tasks} == {
        "land_vision_kpis_parent_fk": set(),
        "land_goals_parent_fk": set(),
        "all_keys_report": {"land_vision_kpis_parent_fk", "land_goals_parent_fk"},
    }
    db.build(3000)
    db.execute("CREATE TABLE goals (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, parent_id bigint, t text)")
    db.execute("INSERT INTO goals (t) SELECT 'goal ' || g FROM generate_series(1, 2000) g")
    db.execute("UPDATE goals SET parent_id = CASE WHEN id % 40 = 0 THEN id + 100000 ELSE id / 2 END WHERE id > 1")
    monkeypatch.setenv("AIRFLOW_CONN_KPI_DB", db.server.airflow_connection_json(db.name))
    conf = {d.name: d.default for d in SETTING_DEFS} | {"validate_now": True, "max_depth": 20}
    for target in load_targets(targets):
        assert orphan_count(db, target.spec) > 0
        run = bag.dags[target.name].test(run_conf=conf)
        assert str(run.state) == "success", target.name
        assert orphan_count(db, target.spec) == 0
        assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = %s", [target.spec.constraint])


# --- who may approve a delete (issue 31) ----------------------------------------------------------------------

DELETE_KEY = """
  - name: posts_account_fk
    table: posts
    column: account_id
    ref_table: accounts
    ref_column: id
    orphans: delete
    constraint: posts_account_id_fkey
    index: posts_account_id_idx
    audit_table: posts_orphan_audit
    conn_ids: [shop]
"""


def test_approvers_are_declared_per_key_or_for_the_whole_file_as_airflow_user_ids(tmp_path) -> None:
    from fk_maintenance.keys.targets import Approver

    path = tmp_path / "targets.yaml"
    own = DELETE_KEY.replace("posts_", "own_posts_")  # its own name, audit table, index and constraint
    path.write_text(
        "approvers: [alice, {id: '7', name: bob}]\n"
        + SHIPPED.read_text()
        + DELETE_KEY
        + own
        + "    approvers: [carol]\n"
    )
    nullify, file_default, declared = load_targets(path)
    assert nullify.approvers == ()  # a key that never deletes asks nobody
    assert file_default.approvers == (Approver("alice", "alice"), Approver("7", "bob"))
    assert declared.approvers == (Approver("carol", "carol"),)  # the key's own list, not added to the file's
    assert file_default.approvers[1].as_hitl_user() == {"id": "7", "name": "bob"}
    assert file_default.approvers[1].described() == "bob (id 7)"


@pytest.mark.parametrize(
    ("approvers", "message"),
    [
        ("approvers: alice", "approvers must be a non-empty list of Airflow user ids, e.g. approvers: [alice, bob]"),
        ("approvers: []", "approvers must be a non-empty list of Airflow user ids"),
        ("approvers: [alice, 5]", "approvers[1]: 5 is not an Airflow user id"),
        ("approvers: [' alice']", "approvers[0]: ' alice' is not an Airflow user id"),
        ("approvers: [{id: 7, name: bob}]", "approvers[0]: {'id': 7, 'name': 'bob'} is not an Airflow user id"),
        ("approvers: [{id: '7'}]", "is not an Airflow user id"),
        ("approvers: [alice, {id: alice, name: Alice}]", "the user id(s) 'alice' are listed more than once"),
    ],
)
@pytest.mark.parametrize("where", ["file", "key"])
def test_bad_approvers_are_refused_when_the_file_is_parsed_naming_the_entry(
    tmp_path, approvers, message, where
) -> None:
    path = tmp_path / "targets.yaml"
    if where == "file":
        path.write_text(approvers + "\n" + SHIPPED.read_text() + DELETE_KEY)
    else:
        path.write_text(SHIPPED.read_text() + DELETE_KEY + "    " + approvers + "\n")
    with pytest.raises(TargetsFileInvalid) as caught:
        load_targets(path)
    assert message in str(caught.value), str(caught.value)
    assert ("foreign_keys[1] ('posts_account_fk')" in str(caught.value)) == (where == "key"), str(caught.value)


def test_approvers_on_a_key_that_never_deletes_are_refused(tmp_path) -> None:
    path = tmp_path / "targets.yaml"
    path.write_text(SHIPPED.read_text().replace("conn_ids: [kpi_db]", "conn_ids: [kpi_db]\n    approvers: [alice]"))
    with pytest.raises(TargetsFileInvalid) as caught:
        load_targets(path)
    assert "foreign_keys[0] ('vision_kpis_parent_fk'): approvers name who may approve a delete" in str(caught.value)
    assert "remove approvers, or declare orphans: delete" in str(caught.value)


def test_the_request_leaves_out_the_user_who_triggered_the_run_and_says_who_may_answer() -> None:
    from fk_maintenance.keys.targets import Approver
    from fk_maintenance.records.approval import answerable_by, approvers_runbook, own_approval, who_may_answer

    alice, bob = Approver("alice", "alice"), Approver("7", "bob")
    assert answerable_by((alice, bob), "bob") == [alice]  # Airflow records the trigger user by name
    assert answerable_by((alice, bob), None) == [alice, bob]  # a scheduled run: any approver
    assert answerable_by((alice,), "alice") == []  # the gate then fails without asking
    assert own_approval({"id": "alice", "name": "alice"}, "alice")
    assert own_approval({"id": "7", "name": "bob"}, "bob") and not own_approval({"id": "7", "name": "bob"}, "alice")
    assert not own_approval({"id": "alice", "name": "alice"}, None)

    assert "**alice**" in who_may_answer([alice], "bob") and "Airflow refuses anyone else's answer" in who_may_answer(
        [alice], "bob"
    )
    assert "**bob**, who triggered this run, may not approve it (four eyes)" in who_may_answer([alice], "bob")
    open_request = who_may_answer([], "carol")
    assert "anyone who may act on this DAG" in open_request and "no `approvers`" in open_request
    assert "**carol**, who triggered this run, may not approve it" in open_request
    assert "No one triggered this run (scheduled, or started by an asset)" in who_may_answer([alice, bob], None)
    assert "`alice`, `bob (id 7)` (the key's `approvers`)" in approvers_runbook([alice, bob])
    assert "declares no `approvers`, so anyone who may act on this DAG" in approvers_runbook([])


def test_a_delete_key_s_dag_assigns_its_approval_to_its_approvers_and_its_runbook_names_them(
    monkeypatch, tmp_path, airflow_home
) -> None:
    targets = tmp_path / "targets.yaml"
    own = DELETE_KEY.replace("name: posts_account_fk", "name: open_posts_fk")
    targets.write_text("approvers: [alice, bob]\n" + SHIPPED.read_text() + DELETE_KEY)
    bag = _bag(monkeypatch, targets)
    assert bag.import_errors == {}
    dag = bag.dags["posts_account_fk"]
    for task_id in ("canary.approve_deletes", "fleet.approve_deletes"):
        assert dag.get_task(task_id).assigned_users == [
            {"id": "alice", "name": "alice"},
            {"id": "bob", "name": "bob"},
        ]
    assert "**Who may approve**: `alice`, `bob` (the key's `approvers`)" in dag.doc_md
    assert "Who may approve" not in bag.dags["vision_kpis_parent_fk"].doc_md  # it never deletes
    # A run may lower the threshold (ask more often), never lift it past the key's own: the form refuses that.
    threshold = dag.params.get_param("approve_deletes_above")
    assert (threshold.value, threshold.schema["maximum"]) == (1000, 1000)

    targets.write_text(SHIPPED.read_text() + own)
    bag = _bag(monkeypatch, targets)
    dag = bag.dags["open_posts_fk"]
    assert dag.get_task("canary.approve_deletes").assigned_users is None
    assert "declares no `approvers`, so anyone who may act on this DAG in Airflow" in dag.doc_md


def test_keys_whose_tables_meet_share_a_lane_in_the_files_order_and_the_others_run_apart(tmp_path) -> None:
    from fk_maintenance.airflow.all_keys import key_lanes

    path = tmp_path / "targets.yaml"
    path.write_text(
        "conn_ids: [db]\nforeign_keys:\n"
        "  - {name: a, table: lines, column: order_id, ref_table: orders, ref_column: id}\n"
        "  - {name: b, table: notes, column: author_id, ref_table: people, ref_column: id}\n"
        "  - {name: c, table: orders, column: customer_id, ref_table: customers, ref_column: id}\n"
        "  - {name: d, table: invoices, column: customer_id, ref_table: customers, ref_column: id}\n"
        "  - {name: e, table: tags, column: parent_id, ref_table: tags, ref_column: id}\n"
    )
    lanes = key_lanes(load_targets(path))
    # a and c meet on orders, c and d on customers: one lane, in the file's order.
    assert [[target.name for target in lane] for lane in lanes] == [["a", "c", "d"], ["b"], ["e"]]
