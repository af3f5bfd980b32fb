"""The declared end state: which foreign key, index and audit table a run converges to."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ON_DELETE_ACTIONS = {
    # pg_constraint.confdeltype code -> SQL spelling
    "n": "SET NULL",
    "c": "CASCADE",
    "r": "RESTRICT",
    "a": "NO ACTION",
    "d": "SET DEFAULT",
}


@dataclass(frozen=True)
class ForeignKeySpec:
    """A foreign key ``schema.table(column) -> schema.ref_table(ref_column)`` and its supporting index.

    ``row_key`` identifies a child row (its primary key); the audit table records it beside the
    pointer that was nulled. For a self-referencing hierarchy it is the referenced column. The audit table
    lives in ``audit_schema``, the pipeline's own, never in the app's ``schema``: the app's schema tool would
    see it there as drift and drop it.
    """

    schema: str
    table: str
    column: str
    ref_table: str
    ref_column: str
    row_key: str
    constraint: str
    index: str
    audit_table: str
    on_delete: str = "SET NULL"
    audit_schema: str = "fk_maintenance"
    # The data's own rules for a self-referencing hierarchy, which a foreign key does not need: no cycle (a row
    # is not its own ancestor) and no chain deeper than the run's max_depth. Checked by preflight before any
    # change and again by post_checks; off unless declared.
    hierarchy_checks: bool = False

    def __post_init__(self) -> None:
        for field, value in asdict(self).items():
            if field == "hierarchy_checks":
                if not isinstance(value, bool):
                    raise ValueError("foreign-key spec: hierarchy_checks must be true or false")
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"foreign-key spec: {field} must be a non-empty string")
            if len(value.encode()) > 63:
                # PostgreSQL silently truncates longer names, which would make our catalog lookups miss.
                raise ValueError(f"foreign-key spec: {field} {value!r} is longer than 63 bytes")
            if "\x00" in value:
                raise ValueError(f"foreign-key spec: {field} contains a NUL character")
        if self.audit_schema == self.schema:
            raise ValueError(
                f"foreign-key spec: audit_schema {self.audit_schema!r} is the app's own schema; the app's schema "
                "tool would drop the audit table there. Use a schema of the pipeline's, such as 'fk_maintenance'"
            )
        if self.hierarchy_checks and not self.self_referential:
            raise ValueError(
                f"foreign-key spec: hierarchy_checks needs a self-referencing key, and {self.table} references "
                f"{self.ref_table}"
            )
        if self.on_delete not in ON_DELETE_ACTIONS.values():
            raise ValueError(
                f"foreign-key spec: on_delete {self.on_delete!r} is not one of {sorted(ON_DELETE_ACTIONS.values())}"
            )

    @property
    def self_referential(self) -> bool:
        """A hierarchy (a row points at a row of its own table): then cycles and depth are checked too."""
        return self.table == self.ref_table

    @property
    def on_delete_code(self) -> str:
        return next(code for code, words in ON_DELETE_ACTIONS.items() if words == self.on_delete)

    @property
    def advisory_lock_name(self) -> str:
        """Two runs serialise on this name, whichever Airflow deployment they come from."""
        return f"fk_maintenance:{self.schema}.{self.table}.{self.constraint}"

    @property
    def audit_qualified(self) -> str:
        return f"{self.audit_schema}.{self.audit_table}"

    @property
    def tables(self) -> tuple[tuple[str, str], ...]:
        """The (schema, table) pairs ADD FOREIGN KEY locks: the referencing and the referenced table."""
        return tuple(dict.fromkeys(((self.schema, self.table), (self.schema, self.ref_table))))

    @property
    def tables_described(self) -> str:
        return " and ".join(f"{schema}.{table}" for schema, table in self.tables)

    @property
    def nulling_transactions_table(self) -> str:
        """The transactions that nulled each run's pointers, for all keys whose audit lives in ``audit_schema``:
        a restore puts a pointer back only where the row is still the version one of them wrote."""
        return "nulling_transactions"

    @property
    def restore_log_table(self) -> str:
        """Every pointer a restore run put back, for all keys whose audit lives in ``audit_schema``."""
        return "restore_log"

    @property
    def restore_log_qualified(self) -> str:
        return f"{self.audit_schema}.{self.restore_log_table}"

    @property
    def legacy_audit_qualified(self) -> str:
        """Where versions before the pipeline's own schema kept the audit table: beside the app's table."""
        return f"{self.schema}.{self.audit_table}"

    def describe(self) -> str:
        return (
            f"{self.schema}.{self.table}({self.column}) -> {self.schema}.{self.ref_table}({self.ref_column}) "
            f"ON DELETE {self.on_delete} as {self.constraint}, index {self.index}"
        )


VISION_KPIS_PARENT_FK = ForeignKeySpec(
    schema="public",
    table="vision_kpis",
    column="parent_kpi_id",
    ref_table="vision_kpis",
    ref_column="id",
    row_key="id",
    constraint="vision_kpis_parent_kpi_id_fkey",
    index="vision_kpis_parent_kpi_idx",
    audit_table="vision_kpis_orphan_audit",
    hierarchy_checks=True,
)
