"""Table names and patterns as users write them: `public.users`, `"My Schema"."Odd Table"`,
`public.*`, `sales.order_?`. A name without a schema means `public`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pgwarden.errors import UserError

GLOB_CHARS = set("*?")


@dataclass(frozen=True, order=True)
class TableName:
    schema: str
    table: str

    def __str__(self) -> str:
        return f"{_show(self.schema)}.{_show(self.table)}"


@dataclass(frozen=True)
class TablePattern:
    text: str
    schema: str
    table: str

    @property
    def is_glob(self) -> bool:
        return bool(GLOB_CHARS & set(self.schema + self.table))

    def is_glob_schema(self) -> bool:
        return bool(GLOB_CHARS & set(self.schema))

    def schema_regex(self) -> str:
        return _glob_to_regex(self.schema)

    def table_regex(self) -> str:
        return _glob_to_regex(self.table)

    def matches(self, name: TableName) -> bool:
        return bool(
            re.fullmatch(self.schema_regex(), name.schema)
            and re.fullmatch(self.table_regex(), name.table)
        )

    def exact(self) -> TableName:
        return TableName(self.schema, self.table)


def _show(part: str) -> str:
    # Quote only when needed, as PostgreSQL's quote_ident would.
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", part):
        return part
    return '"' + part.replace('"', '""') + '"'


def _glob_to_regex(glob: str) -> str:
    out = []
    for char in glob:
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        else:
            out.append(re.escape(char))
    return "^" + "".join(out) + "$"


def split_name(text: str) -> list[str]:
    """Split `a.b` or `"a.x"."b"` into parts; unquoted parts fold to lower case."""
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j = i + 1
            buf = []
            while True:
                if j >= n:
                    raise UserError(f"unterminated quoted name in {text!r}")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = text.find(".", i)
            j = n if j == -1 else j
            part = text[i:j].strip()
            if '"' in part:
                raise UserError(f"misplaced quote in table name {text!r}")
            parts.append(part.lower())
            i = j
        if i < n:
            if text[i] != ".":
                raise UserError(f"expected '.' after a quoted name in {text!r}")
            i += 1
            if i == n:
                raise UserError(f"table name {text!r} ends with '.'")
    if not parts or any(p == "" for p in parts):
        raise UserError(f"{text!r} is not a table name such as 'public.users'")
    return parts


def parse_pattern(text: str) -> TablePattern:
    parts = split_name(text)
    if len(parts) == 1:
        return TablePattern(text, "public", parts[0])
    if len(parts) == 2:
        return TablePattern(text, parts[0], parts[1])
    raise UserError(f"{text!r} has too many parts: write 'schema.table' or 'schema.*'")


def parse_table(text: str) -> TableName:
    pattern = parse_pattern(text)
    if pattern.is_glob:
        raise UserError(f"{text!r} is a pattern; name one table here")
    return pattern.exact()


def parse_key(pairs: Iterable[str], *, option: str = "--key") -> dict[str, str]:
    """A row key given as COLUMN=VALUE pairs (`--key id=42`, or the UI's `key` fields)."""
    key: dict[str, str] = {}
    for pair in pairs:
        column, sep, value = pair.partition("=")
        if not sep or not column:
            raise UserError(f"{option} {pair!r} is not COLUMN=VALUE", hint=f"e.g. {option} id=42")
        key[column] = value
    return key
