"""``fk-maintenance guard MIGRATION.sql``: what ``drizzle-kit generate`` writes for a new foreign key and its index,
rewritten into the guarded form of the shipped migration (app/drizzle/migrations/*_add_parent_kpi_fk.sql): a no-op
where the key and index exist (the pipeline made them), a refusal on a table of ``max_rows`` rows or more that
lacks them (the plain statements would stall the app's writes for the whole scan), the statements themselves on a
small table or a fresh database. The app's workflow: edit schema.ts, generate, guard, run the pipeline, migrate.

A key and the index on exactly its columns become one guarded block, as in the shipped migration; an index of no
new key is guarded alone (built first with CREATE INDEX CONCURRENTLY, it makes the migration a no-op too). Keys
and indexes of a table the migration itself creates (empty then), and every other statement, are left as
drizzle-kit wrote them; a guarded file guarded again is unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import sql

from fk_maintenance.db.sqlfiles import statement
from fk_maintenance.keys.settings import airflow_key_from
from fk_maintenance.keys.targets import Target

BREAKPOINT = "--> statement-breakpoint"
# drizzle-kit's migrator refuses nothing itself; past this many rows a table is a live one (the shipped migration's).
DEFAULT_MAX_ROWS = 10_000
_QUOTED = r'"(?:[^"]|"")*"'
_TABLE = rf"{_QUOTED}(?:\.{_QUOTED})?"
_NAMES = rf"{_QUOTED}(?:\s*,\s*{_QUOTED})*"
# As drizzle-kit 0.31 writes them (PgCreateForeignKeyConvertor, CreatePgIndexConvertor): every name double-quoted.
_FOREIGN_KEY = re.compile(
    rf"^ALTER\s+TABLE\s+(?P<table>{_TABLE})\s+ADD\s+CONSTRAINT\s+(?P<name>{_QUOTED})\s+FOREIGN\s+KEY\s*"
    rf"\((?P<columns>{_NAMES})\)\s*REFERENCES\s+{_TABLE}\s*\({_NAMES}\)[^;]*;?$",
    re.IGNORECASE | re.DOTALL,
)
_INDEX = re.compile(
    rf"^CREATE\s+(?P<unique>UNIQUE\s+)?INDEX\s+(?P<concurrently>CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?"
    rf"(?P<name>{_QUOTED})\s+ON\s+(?:ONLY\s+)?(?P<table>{_TABLE})(?P<rest>\s.*?);?$",
    re.IGNORECASE | re.DOTALL,
)
_CREATE_TABLE = re.compile(rf"^CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<table>{_TABLE})", re.IGNORECASE)
# An index as the pipeline builds one for a key: btree on plain columns, nothing else.
_PLAIN_BTREE = re.compile(rf"^\s*USING\s+btree\s*\((?P<columns>{_NAMES})\)\s*$", re.IGNORECASE)


class GuardRefused(Exception):
    """The migration adds a key the targets file does not declare as the migration has it."""


@dataclass
class _Statement:
    """A statement of the migration guard rewrites: a new foreign key, or a new index."""

    position: int
    kind: str  # "key" or "index"
    name: str
    table: tuple[str, ...]  # as written: (table,) or (schema, table)
    columns: tuple[str, ...]  # a key's; an index's only when it is a plain btree index (else empty)
    text: str  # the statement as written, without its semicolon; CONCURRENTLY dropped (not in a transaction)
    paired: list[_Statement] = field(default_factory=list)

    @property
    def qualified(self) -> tuple[str, str]:
        return _qualified(self.table)

    @property
    def table_text(self) -> str:
        return ".".join(self.table)


def _qualified(table: tuple[str, ...]) -> tuple[str, str]:
    # drizzle-kit qualifies a table of another schema than public; unqualified is public.
    return (table[0], table[1]) if len(table) == 2 else ("public", table[0])


def _names(text: str) -> tuple[str, ...]:
    return tuple(name[1:-1].replace('""', '"') for name in re.findall(_QUOTED, text))


def parse(position: int, text: str) -> _Statement | None:
    """The statement as guard sees it, or None for one it leaves as it is."""
    if match := _FOREIGN_KEY.match(text):
        (name,) = _names(match["name"])
        return _Statement(
            position, "key", name, _names(match["table"]), _names(match["columns"]), text.rstrip().rstrip(";")
        )
    if match := _INDEX.match(text):
        (name,) = _names(match["name"])
        plain = _PLAIN_BTREE.match(match["rest"]) if not match["unique"] else None
        written = text.rstrip().rstrip(";")
        if match["concurrently"]:
            # Inside the migrator's transaction CONCURRENTLY fails; where the guard lets it run, the table is small.
            written = written[: match.start("concurrently")] + written[match.end("concurrently") :]
        return _Statement(
            position, "index", name, _names(match["table"]), _names(plain["columns"]) if plain else (), written
        )
    return None


def guard(
    text: str, *, max_rows: int = DEFAULT_MAX_ROWS, targets: tuple[Target, ...] | None = None
) -> tuple[str, list[str]]:
    """The migration, guarded, and one line per guarded block (what it guards). ``targets``: the keys must be
    declared there, as the migration has them (its DAG ids then name the pipeline to run)."""
    chunks = text.split(BREAKPOINT)
    # A table this migration creates is empty when its keys and indexes are made: nothing there to guard.
    created = {_qualified(_names(m["table"])) for chunk in chunks if (m := _CREATE_TABLE.match(chunk.strip()))}
    found = [
        parsed
        for number, chunk in enumerate(chunks)
        if (parsed := parse(number, chunk.strip())) and parsed.qualified not in created
    ]
    keys = [s for s in found if s.kind == "key"]
    lone = [s for s in found if s.kind == "index"]
    for key in keys:
        serving = next((i for i in lone if i.qualified == key.qualified and i.columns == key.columns), None)
        if serving is not None:
            key.paired.append(serving)
            lone.remove(serving)
    done: list[str] = []
    refused: list[str] = []
    rewritten: list[str | None] = list(chunks)
    for guarded in sorted(keys + lone, key=lambda s: s.position):
        statements = [guarded, *guarded.paired]
        for s in statements:
            rewritten[s.position] = None
        try:
            hint = _hint(guarded, targets)
        except GuardRefused as exc:
            refused.append(str(exc))  # every key's problem named at once
            continue
        # In place of the later one: whatever either needs (a new table or column) comes before it.
        at = max(s.position for s in statements)
        rewritten[at] = f"\n-- Guarded by fk-maintenance guard: {_what(guarded)}.\n{_block(guarded, max_rows, hint)}\n"
        done.append(_what(guarded))
    if refused:
        raise GuardRefused("; ".join(refused))
    if not done:
        return text, done
    kept = [chunk for chunk in rewritten if chunk is not None]
    if "lock_timeout" not in text:
        kept[0] = "\n" + kept[0].lstrip("\n")
        kept.insert(0, statement("guard", "lock_timeout").as_string(None) + "\n")
    return BREAKPOINT.join(kept).lstrip("\n"), done


def _what(guarded: _Statement) -> str:
    if guarded.kind == "index":
        return f"index {guarded.name} on {guarded.table_text}"
    index = f" and its index {guarded.paired[0].name}" if guarded.paired else " (no index on its columns)"
    return f"foreign key {guarded.name}{index} on {guarded.table_text}"


def _hint(guarded: _Statement, targets: tuple[Target, ...] | None) -> str:
    if guarded.kind == "index":
        return (
            f"Build it first without blocking writes, outside a transaction: "
            f"{guarded.text.replace(' INDEX ', ' INDEX CONCURRENTLY ', 1)}; this migration then changes nothing."
        )
    dag_id = _declared(guarded, targets).name if targets is not None else airflow_key_from(guarded.name)
    return (
        f"Run the kpi-fk-maintenance pipeline (Airflow DAG {dag_id}, or fk-maintenance run --key {dag_id}) on this "
        "database first; this migration then changes nothing."
    )


def _declared(key: _Statement, targets: tuple[Target, ...]) -> Target:
    """The declared target of ``key``, or GuardRefused when none is, or it is declared with another index."""
    schema, table = key.qualified
    target = next(
        (t for t in targets if (t.spec.schema, t.spec.table, t.spec.constraint) == (schema, table, key.name)), None
    )
    if target is None:
        raise GuardRefused(
            f"the migration adds the foreign key {key.name} on {schema}.{table}, which the targets file does not "
            "declare, so no pipeline would land it: declare it (a drizzle: entry declares every key of the app's "
            "latest snapshot), or check the name"
        )
    spec = target.spec
    index = key.paired[0].name if key.paired else None
    declared = spec.index if spec.build_index else None
    if index != declared:
        raise GuardRefused(
            f"the migration gives {key.name} the index {index or '(none)'}, and the targets file's key {target.name} "
            f"has {declared or 'none'}: the guard would wait for an index the pipeline never builds. Declare the "
            "key's index in one place (schema.ts, for a key of the Drizzle snapshot) and generate again"
        )
    return target


def _block(guarded: _Statement, max_rows: int, hint: str) -> str:
    """One DO block: nothing where every object exists, a refusal on a large table, else the missing ones."""
    table = sql.Literal(sql.Identifier(*guarded.table).as_string(None))
    objects = [("has_key" if s.kind == "key" else "has_index", s) for s in (guarded, *guarded.paired)]
    # The index before the key, as the pipeline does: the key's checks of deletes use it from the start.
    objects.sort(key=lambda pair: pair[0] != "has_index")
    declarations = [
        statement("guard", flag, table=table, object_name=sql.Literal(s.name)).as_string(None) for flag, s in objects
    ]
    creations = [
        statement("guard", "create_if_missing", flag=sql.SQL(flag), statement=sql.SQL(s.text)).as_string(None)
        for flag, s in objects
    ]
    missing = " or ".join(s.name for _, s in objects)
    body = statement(
        "guard",
        "guarded",
        declarations=sql.SQL(_indented(declarations)),
        present=sql.SQL(" AND ".join(flag for flag, _ in objects)),
        table=sql.Identifier(*guarded.table),
        max_rows=sql.Literal(max_rows),
        message=sql.Literal(f"{guarded.table_text} holds {max_rows} rows or more and lacks {missing}"),
        hint=sql.Literal(hint),
        creations=sql.SQL(_indented(creations)),
    ).as_string(None)
    tag = "$$"
    while tag in body:  # a dollar quote the body does not hold
        tag = f"$guard{len(tag)}$"
    return f"DO {tag}\n{body} {tag};"


def _indented(fragments: list[str]) -> str:
    return "\n".join("\t" + line if line else line for fragment in fragments for line in fragment.splitlines())


def guard_file(
    path: Path, *, in_place: bool, max_rows: int, targets: tuple[Target, ...] | None
) -> tuple[str, list[str]]:
    """The guarded migration (written back to ``path`` with ``in_place``, atomically) and what was guarded."""
    guarded, done = guard(path.read_text(), max_rows=max_rows, targets=targets)
    if in_place and done:
        temporary = path.with_name(f".{path.name}.guard")
        temporary.write_text(guarded)
        temporary.replace(path)
    return guarded, done
