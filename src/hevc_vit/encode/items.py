"""One input of ``hevc-vit encode`` after expansion (:class:`InputSpec`), and where the bytes of an input that is
not a plain local file come from: a member of a webdataset tar shard, a URL, a row of an in-memory collection
(a ``datasets.Dataset``, PIL images, arrays, tensors).

An input's ``path`` is its name in the index and for ``--resume``: unique in a run and the same in every run
given the same inputs. A tar member is named with fsspec's chained URL, ``tar://MEMBER::SHARD``, which
``fsspec.open`` opens as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .remote import read_location


@dataclass(frozen=True)
class TarMember:
    """A member of a tar shard: its name, and where its bytes lie in the shard (so it is read with one seek)."""

    shard: str  # local path or URL of the .tar
    name: str
    offset: int
    size: int


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


def fetch(ref: ItemRef, memory: list[Any], retries: int) -> Fetched:
    """The content ``ref`` points at. A URL is read with ``retries`` retries; what cannot be read raises (the
    loader records the reason as the input's failure)."""
    if isinstance(ref, TarMember):
        return Fetched(ref.name, data=read_location(ref.shard, retries, ref.offset, ref.size))
    if isinstance(ref, RemoteFile):
        return Fetched(ref.url, data=read_location(ref.url, retries))
    if isinstance(ref, MemoryRow):
        from .objects import fetch_memory_row

        return fetch_memory_row(memory[ref.source], ref.row, retries)
    raise TypeError(f"ref is a {type(ref).__name__}; expected a TarMember, RemoteFile or MemoryRow")
