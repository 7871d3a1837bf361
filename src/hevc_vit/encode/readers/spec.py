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

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from PIL import Image

from hevc_vit.encode.readers.remote import Network, is_url, read_location

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


def fetch(ref: ItemRef, memory: list[Any], network: Network) -> Fetched:
    """The content ``ref`` points at. A URL is read as ``network`` says (timeouts, retries); what cannot be read
    raises (the loader records the reason as the input's failure)."""
    if isinstance(ref, TarMember):
        return Fetched(ref.name, data=read_location(ref.shard, network, ref.offset, ref.size))
    if isinstance(ref, RemoteFile):
        return Fetched(ref.url, data=read_location(ref.url, network))
    if isinstance(ref, MemoryRow):
        from hevc_vit.encode.readers.memory import fetch_memory_row

        return fetch_memory_row(memory[ref.source], ref.row, network)
    raise TypeError(f"ref is a {type(ref).__name__}; expected a TarMember, RemoteFile or MemoryRow")
