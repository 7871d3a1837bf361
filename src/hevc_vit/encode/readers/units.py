"""Work units: what rank 0 shares out among the ranks of a run, and how the rank that takes a unit lists it.

Rank 0 expands the inputs only as far as units (:func:`.sources.expand_units`): a loose file or URL is one unit
of one item; a webdataset tar shard is one unit, its samples listed by the rank that takes it; a parquet table
is one unit per row group (its footer gives the row groups without reading a row); a csv/tsv/jsonl table is one
unit; an in-memory source is one unit per ``MEMORY_UNIT_ROWS`` rows. Unit ``u`` goes to rank ``u % world``,
which lists it into items (:func:`list_share`).

An item's name (its ``path``) does not depend on the unit it came in, so ``--resume`` (keyed by path) works
whatever the world size of the earlier run. Its shard key is the unit's number, ``UUUUUUUU`` for a unit of one
item and ``UUUUUUUU-IIIIIIII`` (``I``: the item's place in its unit) for the items of a tar, a table or a
memory source (:func:`.spec.item_key`): unique in the run, the same at any world size, and in input order. In a
folder that holds rows already (``--resume``), an input keeps the key of its row and a new input never takes a key
another input holds (:class:`.spec.KeyBook`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hevc_vit.encode.readers.memory import MemorySource
from hevc_vit.encode.readers.remote import Network, check_url_packages
from hevc_vit.encode.readers.spec import InputSpec, KeyBook, RemoteFile, WorkUnit, describe_error, is_url
from hevc_vit.encode.readers.tables import TableColumnError, check_columns, first_value, table_layout, table_specs
from hevc_vit.encode.readers.tar import list_tar

DEFAULT_NETWORK = Network()
MEMORY_UNIT_ROWS = 1024  # rows of an in-memory source (a dataset) per unit


def memory_units(source: MemorySource) -> list[WorkUnit]:
    """The units of an in-memory source: ``MEMORY_UNIT_ROWS`` rows each."""
    n = len(source.paths)
    return [
        WorkUnit("memory", start=s, stop=min(n, s + MEMORY_UNIT_ROWS), source=source.number)
        for s in range(0, n, MEMORY_UNIT_ROWS)
    ]


def table_units(
    location: str, path_column: str | None, keep_columns: Sequence[str], network: Network
) -> list[WorkUnit]:
    """The units of a table: its columns are checked here (a missing path or kept column raises
    :class:`TableColumnError` before the run starts); a parquet file gives one unit per row group, another table
    one unit. A table that cannot be read is one failed item."""
    try:
        columns, groups = table_layout(location, network)
        column = check_columns(location, columns, path_column, keep_columns)
        first = first_value(location, column, network)
        if isinstance(first, str) and is_url(first.strip()):  # a package its URLs need: named before the run
            check_url_packages([first.strip()])
    except (TableColumnError, ImportError):
        raise  # the caller's mistake or a missing extra: the run stops before it starts
    except Exception as e:  # an unreadable or damaged table: one failed row
        return [WorkUnit.item(InputSpec(location, f"cannot read this table: {describe_error(e)}"))]
    if groups is None:
        return [WorkUnit("table", location)]
    if sum(groups) == 0:
        return [WorkUnit.item(InputSpec(location, "the table has no rows"))]
    starts = [sum(groups[:g]) for g in range(len(groups))]
    return [WorkUnit("row_group", location, group=g, start=starts[g]) for g in range(len(groups))]


@dataclass
class Share:
    """A rank's items, listed from its units in unit order: ``specs`` and their shard ``keys`` (one each), and
    ``listed``: the item paths of every unit of more than one item listed here, by unit number (for the merge)."""

    specs: list[InputSpec] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    listed: dict[int, list[str]] = field(default_factory=dict)


def list_share(
    units: Sequence[WorkUnit],
    rank: int,
    world: int,
    path_column: str | None = None,
    keep_columns: Sequence[str] = (),
    network: Network = DEFAULT_NETWORK,
    memory: Mapping[int, MemorySource] | None = None,
    keys: KeyBook | None = None,
) -> Share:
    """The items of the units that rank ``rank`` of ``world`` takes (unit ``u`` when ``u % world == rank``);
    ``keys``: the keys the output folder holds already (None: a new folder)."""
    share, keys = Share(), keys or KeyBook()
    for u in range(rank, len(units), world):
        unit = units[u]
        if unit.kind == "item":
            share.specs.append(unit.spec)
            share.keys.append(keys.key(unit.spec.path, u))
            continue
        specs = list_unit(unit, path_column, keep_columns, network, memory or {})
        share.specs.extend(specs)
        share.keys.extend(keys.key(spec.path, u, j) for j, spec in enumerate(specs))
        share.listed[u] = [spec.path for spec in specs]
    return share


def list_unit(
    unit: WorkUnit,
    path_column: str | None,
    keep_columns: Sequence[str],
    network: Network,
    memory: Mapping[int, MemorySource],
) -> list[InputSpec]:
    """The items of one unit, in order, without duplicates; what cannot be read is a failed item. A table whose
    URLs need a package that is not installed raises ``ImportError``."""
    if unit.kind == "item":
        return [unit.spec]
    if unit.kind == "tar":
        specs = list_tar(unit.location, network, keep_columns)
    elif unit.kind == "memory":
        specs = memory[unit.source].specs(unit.start, unit.stop)
    elif unit.kind in ("table", "row_group"):
        group = unit.group if unit.kind == "row_group" else None
        try:
            specs = table_specs(unit.location, path_column, keep_columns, network, group, unit.start)
        except Exception as e:  # damaged since rank 0 read its layout, or a row group that cannot be read
            what = f"row group {unit.group} of this table" if group is not None else "this table"
            return [InputSpec(unit.name, f"cannot read {what}: {describe_error(e)}")]
        if not specs and group is None:
            return [InputSpec(unit.location, "the table has no rows")]
        # a package its URLs need and that is missing stops the run here, named once, not once per row
        check_url_packages(spec.path for spec in specs if isinstance(spec.ref, RemoteFile))
    else:
        raise AssertionError(f"unit kind {unit.kind!r}")
    return [specs[j] for j in first_listings(specs)]


def first_listings(specs: Sequence[InputSpec]) -> list[int]:
    """The positions of ``specs`` that name their path for the first time (a path is encoded once)."""
    seen: dict[str, int] = {}
    for j, spec in enumerate(specs):
        seen.setdefault(spec.path, j)
    return sorted(seen.values())


def items_to_encode(share: Share, done: set[str]) -> list[int]:
    """The positions of the share's items to encode: listed without an error, not done by an earlier run, and
    the first listing of their path (two tables may name one file)."""
    return [j for j in first_listings(share.specs) if not share.specs[j].error and share.specs[j].path not in done]


def ordered_paths(units: Sequence[WorkUnit], listed: Mapping[int, list[str]]) -> list[str]:
    """Every item's path in input order (unit order, then item order in the unit), each once (a path met in two
    units, e.g. named by two tables, is kept where it is first met)."""
    paths: dict[str, None] = {}
    for u, unit in enumerate(units):
        for path in [unit.spec.path] if unit.kind == "item" else listed[u]:
            paths.setdefault(path)
    return list(paths)


def remote_item(location: str) -> WorkUnit:
    """A file behind a URL, or a local file: one unit of one item."""
    return WorkUnit.item(InputSpec(location, ref=RemoteFile(location) if is_url(location) else None))
