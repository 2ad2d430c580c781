"""Versioned shard schemas, defined once in language-neutral JSON beside this file.

Each ``<table>_v<N>.json`` lists fields with a name, a type and a doc string.
Types: ``string``, ``binary``, ``bool``, ``int32``, ``int64``, ``float32`` and
``list<float32>``. The pyarrow schema (and, for pairs, the ``tf.train.Example``
feature spec) are derived here, so writers and readers share one definition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent

# The current version of each table; bump it (and add a new JSON file) on any change.
# Readers accept every version. pair_v2 / image_v2 are v1 plus patch tokens, written only
# by `build --store-tokens`; a build without tokens still writes v1.
CURRENT = {
    "pair": "pair_v1",
    "image": "image_v1",
    "similarity": "similarity_v1",
    "reject": "reject_v1",
}

SCHEMA_METADATA_KEY = b"pairmill.schema"


@dataclass(frozen=True)
class Field:
    """One column.

    Args:
      name: column name.
      type: one of the language-neutral type names above.
      doc: what the column holds.
      nullable: whether a row may leave it empty.
    """

    name: str
    type: str
    doc: str
    nullable: bool = False


@dataclass(frozen=True)
class Schema:
    """A versioned table definition.

    Args:
      id: ``<table>_v<N>``, e.g. ``pair_v1``.
      name: the table name.
      version: the integer version.
      doc: what one row is.
      fields: the columns, in order.
    """

    id: str
    name: str
    version: int
    doc: str
    fields: tuple[Field, ...]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def arrow(self):
        """The pyarrow schema, with the schema id in its metadata."""
        import pyarrow as pa

        return pa.schema(
            [pa.field(f.name, _ARROW_TYPES[f.type](pa), nullable=f.nullable) for f in self.fields],
            metadata={SCHEMA_METADATA_KEY: self.id.encode()},
        )

    def tf_feature_spec(self) -> dict[str, tuple[str, str]]:
        """Feature spec for ``tf.io.parse_single_example``: name -> (kind, dtype).

        kind is ``FixedLenFeature`` for scalars (bytes, int64 or float32 lists of
        length 1) and ``VarLenFeature`` for ``list<float32>``.
        """
        spec = {}
        for f in self.fields:
            dtype = _TF_TYPES[f.type]
            kind = "VarLenFeature" if f.type.startswith("list<") else "FixedLenFeature"
            spec[f.name] = (kind, dtype)
        return spec


def _list_float32(pa):
    return pa.list_(pa.float32())


_ARROW_TYPES = {
    "string": lambda pa: pa.string(),
    "binary": lambda pa: pa.binary(),
    "bool": lambda pa: pa.bool_(),
    "int32": lambda pa: pa.int32(),
    "int64": lambda pa: pa.int64(),
    "float32": lambda pa: pa.float32(),
    "list<float32>": _list_float32,
}
_TF_TYPES = {
    "string": "string",
    "binary": "string",
    "bool": "int64",
    "int32": "int64",
    "int64": "int64",
    "float32": "float32",
    "list<float32>": "float32",
}


@cache
def load(schema_id: str) -> Schema:
    """Load a schema by id (``pair_v1``) or table name (``pair``: the current version)."""
    schema_id = CURRENT.get(schema_id, schema_id)
    path = _HERE / f"{schema_id}.json"
    if not path.exists():
        known = sorted(p.stem for p in _HERE.glob("*_v*.json"))
        raise KeyError(f"unknown schema {schema_id!r}; known: {', '.join(known)}")
    raw = json.loads(path.read_text())
    fields = tuple(
        Field(f["name"], f["type"], f.get("doc", ""), bool(f.get("nullable", False)))
        for f in raw["fields"]
    )
    for f in fields:
        if f.type not in _ARROW_TYPES:
            raise ValueError(f"{schema_id}: field {f.name} has unknown type {f.type!r}")
    return Schema(schema_id, raw["name"], int(raw["version"]), raw.get("doc", ""), fields)


def versions(table: str) -> list[Schema]:
    """Every version of a table's schema, oldest first (``versions("pair")``)."""
    found = sorted(_HERE.glob(f"{table}_v*.json"), key=lambda p: int(p.stem.rsplit("_v", 1)[1]))
    return [load(p.stem) for p in found]


def matching(table: str, names) -> Schema | None:
    """The version of `table` whose columns are exactly `names` (any order), if any."""
    wanted = set(names)
    for schema in versions(table):
        if set(schema.names) == wanted:
            return schema
    return None


def schema_id_of(arrow_schema) -> str | None:
    """The pairmill schema id recorded in a pyarrow schema's metadata, if any."""
    meta = arrow_schema.metadata or {}
    value = meta.get(SCHEMA_METADATA_KEY)
    return value.decode() if value else None
