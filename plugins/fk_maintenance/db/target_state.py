"""What the catalog holds for a key: its tables, columns, constraint, index and partitions, as the catalog
reads left them (fk_maintenance.db.catalog). Plain data: the SQL composition (sqlfiles) reads the key columns'
types from here without importing the catalog's queries."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TableInfo:
    oid: int
    relkind: str
    total_bytes: int
    estimated_rows: int
    owner: str


@dataclass(frozen=True)
class ColumnInfo:
    attnum: int
    type_name: str
    type_oid: int
    not_null: bool


@dataclass(frozen=True)
class ConstraintState:
    exists: bool
    matches: bool = False
    validated: bool = False
    definition: str = ""
    mismatches: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexState:
    exists: bool
    is_index: bool = False
    matches: bool = False
    valid: bool = False
    definition: str = ""
    mismatches: tuple[str, ...] = ()
    on_target_table: bool = False
    build_in_progress_pid: int | None = None
    # Another name than the declared one: an index that already served the key, used instead of building one.
    name: str = ""


@dataclass(frozen=True)
class PartitionInfo:
    """A partition of a partitioned child table, and what the key has on it so far."""

    schema: str
    name: str
    oid: int
    relkind: str
    level: int
    total_bytes: int
    estimated_rows: int
    owner: str
    attached_index: str | None  # its index attached to ours (None: not yet)
    index_valid: bool
    key_exists: bool  # a constraint of our name
    key_validated: bool
    key_inherited: bool  # the parent's key, cloned onto it (18's NOT VALID parent, or adopted)
    key_oid: int | None
    can_create_in_schema: bool
    # How a constraint of our name on it differs from the key (another definition: not ours to adopt).
    key_mismatches: tuple[str, ...] = ()

    @property
    def qualified(self) -> tuple[str, str]:
        return (self.schema, self.name)

    @property
    def described(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class EqualKey:
    """A foreign key equal to the declared one in every part, under another name, where the declared one is not."""

    relid: int
    schema: str
    table: str
    name: str

    @property
    def described(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass
class TargetState:
    """What the database holds for the key: its tables, and each of its columns (in the spec's order; a list is
    None until every one of its columns was found)."""

    table: TableInfo | None = None
    ref_table: TableInfo | None = None
    columns: tuple[ColumnInfo, ...] | None = None
    ref_columns: tuple[ColumnInfo, ...] | None = None
    row_key: tuple[ColumnInfo, ...] | None = None
    constraint: ConstraintState = field(default_factory=lambda: ConstraintState(exists=False))
    index: IndexState = field(default_factory=lambda: IndexState(exists=False))
    problems: list[str] = field(default_factory=list)
    # The key's columns nulling an orphan sets to NULL (see nulled_columns).
    nulled: tuple[str, ...] = ()
    # What a run does to orphans (see orphan_policy).
    policy: str = ""
    # A partitioned child's partitions (empty for a plain table): the index and the key are built on each.
    partitions: tuple[PartitionInfo, ...] = ()
    # Keys equal to the declared one under other names, where it is not yet (catalog.equal_keys): read once.
    equal_keys: tuple[EqualKey, ...] = ()

    @property
    def partitioned(self) -> bool:
        return self.table is not None and self.table.relkind == "p"

    @property
    def total_bytes(self) -> int:
        """The table's size: a partitioned table's own is 0, its partitions hold the rows."""
        assert self.table is not None
        return self.table.total_bytes + sum(part.total_bytes for part in self.partitions)

    @property
    def estimated_rows(self) -> int:
        """A partitioned table's from its partitions: autovacuum analyzes those, never the parent."""
        assert self.table is not None
        if self.partitioned:
            return sum(part.estimated_rows for part in self.partitions)
        return self.table.estimated_rows

    @property
    def partitions_missing_key(self) -> tuple[PartitionInfo, ...]:
        return tuple(part for part in self.partitions if not part.key_exists)

    @property
    def partitions_to_validate(self) -> tuple[PartitionInfo, ...]:
        return tuple(part for part in self.partitions if part.key_exists and not part.key_validated)

    @property
    def key_added(self) -> bool:
        """add_fk_not_valid has run: the key exists on the table or, before 18, on some partition (one created
        since then has none yet, and validate_fk gives it one)."""
        return self.constraint.exists or any(part.key_exists for part in self.partitions)

    @property
    def key_on_every_row(self) -> bool:
        """Every new write is checked: the key exists on the table, or (a partitioned child before PostgreSQL 18,
        whose parent cannot take a NOT VALID key) on each of its partitions."""
        if self.constraint.exists:
            return True
        return self.partitioned and bool(self.partitions) and not self.partitions_missing_key

    @property
    def complete(self) -> bool:
        return self.columns is not None and self.ref_columns is not None and self.row_key is not None

    @property
    def not_null_key(self) -> bool:
        """No column of the key may be nulled, so an orphan cannot be made to pass the key by nulling."""
        return self.complete and not self.nulled

    @property
    def row_key_types(self) -> tuple[str, ...]:
        assert self.row_key is not None
        return tuple(info.type_name for info in self.row_key)

    @property
    def pointer_types(self) -> tuple[str, ...]:
        assert self.columns is not None
        return tuple(info.type_name for info in self.columns)
