"""One input of ``hevc-vit encode`` after expansion (:class:`InputSpec`), and where the bytes of an input that is
not a plain local file come from: a member of a webdataset tar shard, a URL, a row of an in-memory collection
(a ``datasets.Dataset``, PIL images, arrays, tensors).

An input's ``path`` is its name in the index and for ``--resume``: unique in a run and the same in every run
given the same inputs. A tar member is named with fsspec's chained URL, ``tar://MEMBER::SHARD``, which
``fsspec.open`` opens as it is; a member or a local shard whose name fsspec would split (it holds ``::``, the
separator of chained URLs) is named ``tar-quoted://MEMBER::SHARD`` with both parts percent-encoded instead.
:func:`split_tar_path` gives ``(member, shard)`` back from either form (:func:`tar_path` is its inverse).
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
from PIL import Image

TAR_PREFIX, QUOTED_TAR_PREFIX = "tar://", "tar-quoted://"


@dataclass(frozen=True)
class TarMember:
    """A member of a tar shard: its name, and where its bytes lie in the shard (so it is read with one seek)."""

    shard: str  # local path or URL of the .tar
    name: str
    offset: int
    size: int


def tar_path(member: str, shard: str) -> str:
    """The path of member ``member`` of the tar shard ``shard`` (a local path or a URL): ``tar://MEMBER::SHARD``
    when fsspec reads it back as that member of that shard, else ``tar-quoted://`` and both parts
    percent-encoded (``%3A%3A`` for ``::``). ``split_tar_path(tar_path(m, s)) == (m, s)`` for any names."""
    plain = f"{TAR_PREFIX}{member}::{shard}"
    # fsspec splits a chained URL at every "::": the member must hold none (nor end in ":", which would move the
    # split), and a local shard neither (a URL's "::" chains it further, as fsspec reads it)
    if _split_plain(plain) == (member, shard) and (is_url(shard) or "::" not in shard) and not shard.startswith(":"):
        return plain
    return f"{QUOTED_TAR_PREFIX}{quote(member, safe='/')}::{quote(shard, safe='/')}"


def split_tar_path(path: str) -> tuple[str, str]:
    """``(member, shard)`` of a tar member's path (either form :func:`tar_path` writes); ``ValueError`` for
    another path."""
    if path.startswith(QUOTED_TAR_PREFIX):
        member, sep, shard = path[len(QUOTED_TAR_PREFIX) :].partition("::")
        if sep:
            return unquote(member), unquote(shard)
    elif path.startswith(TAR_PREFIX) and "::" in path:
        return _split_plain(path)
    raise ValueError(f"{path!r} is not a tar member's path; expected tar://MEMBER::SHARD or tar-quoted://MEMBER::SHARD")


def _split_plain(path: str) -> tuple[str, str]:
    member, _, shard = path[len(TAR_PREFIX) :].partition("::")
    return member, shard


@dataclass(frozen=True)
class RemoteFile:
    """A file behind a URL, read through fsspec."""

    url: str


@dataclass(frozen=True)
class MemoryRow:
    """Row ``row`` of the in-memory collection number ``source`` of the run (see :mod:`.objects`)."""

    source: int
    row: int


ItemRef = TarMember | RemoteFile | MemoryRow


@dataclass
class InputSpec:
    """One input after expansion: its path as given (its name in the index), or why it could not be found.

    ref: where its bytes come from when it is not a local file (None: the local file ``path``). extra: fields
    copied into its index row (``id``, a table's ``--keep-columns``). sidecars: kept columns read from files
    beside the input (a webdataset sample's ``txt``/``json`` members, a folder's ``KEY.txt``): column -> a local
    path or where the bytes are, read by the loader (:mod:`.sidecars`).
    """

    path: str
    error: str = ""
    ref: ItemRef | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sidecars: dict[str, ItemRef | str] = field(default_factory=dict)


def spec_path(source: str | InputSpec) -> str:
    """The path of an input given as a path or as an :class:`InputSpec`."""
    return source.path if isinstance(source, InputSpec) else source


@dataclass
class Fetched:
    """The content of one input that is not a local file: encoded bytes and a name (whose extension tells an
    image from a video), or an image already decoded (from memory)."""

    name: str
    data: bytes | None = None
    image: Image.Image | None = None


def item_key(unit: int, item: int | None = None) -> str:
    """The key of an item in its shard: ``UUUUUUUU``, the number of its work unit among the run's units, for a
    unit of one item (a file); ``UUUUUUUU-IIIIIIII`` for item ``item`` of a unit of many (a tar shard, a table,
    rows in memory). Unique in a run, the same at any world size (see :mod:`.units`)."""
    return f"{unit:08d}" if item is None else f"{unit:08d}-{item:08d}"


@dataclass
class KeyBook:
    """The keys of an output folder: a key names one input for as long as the folder exists (retrieval joins on
    it), across runs and ``--resume`` with other inputs. An input that has a row keeps that row's key; a new input
    takes its natural key (:func:`item_key` of its unit and place) unless another input holds it, and else the
    same key with ``base`` added to the unit's number: past every unit number of the folder and of this run, so
    never a key in use, nor one that this run gives as a natural key."""

    earlier: dict[str, str] = field(default_factory=dict)  # path -> key, every row of the folder
    base: int = 0

    @classmethod
    def of(cls, rows: Iterable[dict[str, Any]], units: int) -> KeyBook:
        """The book of a folder whose rows are ``rows``, for a run of ``units`` work units."""
        earlier = {row["path"]: row["key"] for row in rows if isinstance(row.get("key"), str) and row["key"]}
        numbers = [int(head) for head in (key.split("-")[0] for key in earlier.values()) if head.isdigit()]
        return cls(earlier, max([units, *(n + 1 for n in numbers)]))

    @cached_property
    def _held(self) -> set[str]:
        return set(self.earlier.values())

    def key(self, path: str, unit: int, item: int | None = None) -> str:
        """The key of the input ``path``, item ``item`` of unit ``unit`` (None: a unit of one item)."""
        if path in self.earlier:
            return self.earlier[path]
        natural = item_key(unit, item)
        return natural if natural not in self._held else item_key(self.base + unit, item)


def json_value(value: Any) -> Any:
    """``value`` as a value that strict JSON holds: NaN and ±inf become null (``json.dumps`` would write the
    non-JSON tokens ``NaN`` / ``Infinity``), numpy scalars and arrays their Python numbers and lists, dates, times
    and decimals their text (ISO 8601), bytes ``"<N bytes>"``, sets sorted lists, mapping keys text; anything
    else its ``str``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.generic, np.ndarray)):
        return json_value(value.tolist())  # numpy scalar -> Python number, array -> nested lists
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_value(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    return str(value)  # decimals (exact text), timedeltas, UUIDs, paths, ...


@dataclass(frozen=True)
class WorkUnit:
    """One unit of work. kind: ``item`` (``spec``, listed already), ``tar`` (the shard ``location``), ``table``
    (the csv/tsv/jsonl ``location``), ``row_group`` (group ``group`` of the parquet ``location``, whose first row
    is row ``start`` of the table) or ``memory`` (rows ``start`` to ``stop`` of the memory source ``source``)."""

    kind: str
    location: str = ""
    spec: InputSpec | None = None
    group: int = 0
    start: int = 0
    stop: int = 0
    source: int = 0

    @classmethod
    def item(cls, spec: InputSpec) -> WorkUnit:
        return cls("item", spec.path, spec=spec)

    @property
    def name(self) -> str:
        """Unique among the units of a run: the item's path, the shard or table, the row group, the rows."""
        if self.kind == "row_group":
            return f"{self.location}#rowgroup{self.group}"
        if self.kind == "memory":
            return f"memory[{self.source}][{self.start}:{self.stop}]"
        return self.location


def describe_error(e: BaseException) -> str:
    """``"TypeName: message"`` (the message alone when it already starts with the type's name)."""
    message = str(e).strip() or type(e).__name__
    return message if message.startswith(type(e).__name__) else f"{type(e).__name__}: {message}"


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str) -> bool:
    """``location`` names a protocol (``s3://...``, ``file://...``, a chained ``tar://m::s3://...``)."""
    return bool(_URL.match(location))
