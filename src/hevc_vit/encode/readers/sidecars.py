"""Sidecars: the files that describe an image or video beside it, as img2dataset and webdataset write them
(``000123.jpg`` with ``000123.txt`` and ``000123.json``), and the metadata files of such a dataset
(``00000.parquet``, ``00000_stats.json``).

A file's key is its name up to the first dot and its extension the rest, as webdataset splits them. In a folder,
a ``txt``/``json``/``cls`` file (or one whose extension ``--keep-columns`` names) whose key is also a media file's
key is that file's sidecar, and a table or JSON
file that is no media file's sidecar is the dataset's metadata: neither is an input. ``--keep-columns txt,json``
copies sidecars into the row of their image (:func:`sidecar_value`: ``txt`` as its text, ``json`` parsed,
``cls`` as an integer); a kept extension that an item lacks is left out of its row. Other files (a stray ``notes.txt``
with no image of its key) stay inputs, and get a failed row that names them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from hevc_vit.encode.readers.fetch import fetch
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import ItemRef
from hevc_vit.media.kinds import METADATA_EXTENSIONS, SIDECAR_EXTENSIONS

MAX_SIDECAR_BYTES = 16 * 1024 * 1024


def split_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a file name (no folder, not hidden): ``000123.seg.txt`` -> ``000123``, ``seg.txt``."""
    key, _, extension = name.partition(".")
    return key, extension


def _last(extension: str) -> str:
    return extension.rsplit(".", 1)[-1].lower()


def folder_inputs(names: Sequence[str], keep: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """The inputs among the file ``names`` of one folder: ``(name, {column: sidecar name})`` for each, in order;
    sidecars and metadata files are left out (see the module's docstring)."""
    split = {name: split_name(name) for name in names}
    sidecar = SIDECAR_EXTENSIONS | {_last(column) for column in keep}  # a kept "caption" is a sidecar too
    media_keys = {key for key, ext in split.values() if _last(ext) not in sidecar | METADATA_EXTENSIONS}
    by_key: dict[tuple[str, str], str] = {(key, ext): name for name, (key, ext) in split.items()}
    out = []
    for name in names:
        key, ext = split[name]
        last = _last(ext)
        if last in sidecar and key in media_keys:
            continue  # a sidecar: a column of the media file(s) of its key
        if last in METADATA_EXTENSIONS:
            continue  # a table or JSON file of the dataset, not an image or a video
        found = {column: by_key[(key, column)] for column in keep if (key, column) in by_key}
        out.append((name, found))
    return out


def read_sidecars(sidecars: dict[str, ItemRef | str], memory: list, network: Network) -> dict[str, Any]:
    """The index-row values of an item's sidecars (column -> local path, or where the bytes are)."""
    values = {}
    for column, where in sidecars.items():
        if isinstance(where, str):
            size = os.path.getsize(where)
            _check_size(column, size)
            with open(where, "rb") as f:
                data = f.read()
        else:
            data = fetch(where, memory, network).data or b""
        values[column] = sidecar_value(column, data)
    return values


def _check_size(column: str, size: int) -> None:
    if size > MAX_SIDECAR_BYTES:
        raise ValueError(
            f"the {column} sidecar holds {size} bytes, more than the {MAX_SIDECAR_BYTES} a kept column may hold"
        )


def sidecar_value(column: str, data: bytes) -> Any:
    """A sidecar's bytes as its row's value: UTF-8 text, parsed for ``json``, an integer for ``cls``."""
    _check_size(column, len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the {column} sidecar is not UTF-8 text (byte 0x{data[e.start]:02x} at {e.start})") from None
    last = _last(column)
    if last == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the {column} sidecar is not valid JSON: {e}") from None
    if last == "cls":
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"the {column} sidecar holds {text[:40]!r}; expected an integer class") from None
    return text
