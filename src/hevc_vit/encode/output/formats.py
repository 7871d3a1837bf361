"""Output formats of ``hevc-vit encode`` (``--output-format``) besides safetensors shards, and the storage dtype.

    safetensors   shards/rankRRRRR-NNNNN.safetensors: KEY.patches, KEY.pooled, KEY.grid_thw (:mod:`.shards`)
    npy-parquet   embeddings/rankRRRRR-NNNNN.npy: the pooled vectors (n, D), one row per item, in the order of
                  metadata/rankRRRRR-NNNNN.parquet: key, id, path, kind, grid_thw, size and the kept columns —
                  the layout clip-retrieval writes and autofaiss reads (numpy and pyarrow open it)
    parquet       parts/rankRRRRR-NNNNN.parquet: the metadata columns, ``patches`` (list of D-vectors per item)
                  and ``pooled``, for readers that want one table
    clip-retrieval  img_emb/img_emb_N.npy and metadata/metadata_N.parquet (N: rankRRRRR-NNNNN), clip-retrieval's
                  own names: the L2-normalised pooled vectors and their rows in the same order, with ``image_path``
                  (and ``caption``, when kept from a table) besides the npy-parquet columns. Sorted by name, the
                  two folders pair file for file, as ``clip-retrieval index``/autofaiss (embedding_reader) read them

A part is written whole or not at all, like a shard: every file to a temporary name, synced, then published
under a name that must not exist (the ``.npy`` before its metadata, which the index rows name); only then are
its rows appended to the index, which commit it: ``--resume`` removes part files no row names (:mod:`.recovery`)
and reads a part's ``key`` column to know what it holds.

numpy and Arrow have no bfloat16: those formats take float16 (npy-parquet's default) or float32.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hevc_vit.encode.options.choices import (  # noqa: F401  (the choices were public here before)
    INSTALL_HINT,
    METADATA_COLUMNS,
    OUTPUT_FORMATS,
    POOLED_FORMATS,
    RESERVED_COLUMNS,
    STORAGE_DTYPES,
    check_storage_dtype,
)
from hevc_vit.encode.output.index import shard_name
from hevc_vit.files import publish_new, temporary_sibling

FOLDERS = {
    "safetensors": ("shards",),
    "npy-parquet": ("metadata", "embeddings"),
    "parquet": ("parts",),
    "clip-retrieval": ("metadata", "img_emb"),
}
# exactly the names a run writes in those folders (a part's file, or its temporary file)
PART_NAME = re.compile(r"^(?:img_emb_|metadata_)?rank(\d{5,})-(\d{5,})\.(safetensors|npy|parquet)(\.tmp\d+)?$")


def storage_dtype(output_format: str, asked: str | None, compute: torch.dtype) -> torch.dtype:
    """The dtype features are stored in: ``asked``, else float16 for npy-parquet and the compute dtype otherwise
    (bfloat16 computed for parquet is stored as float32: Arrow has no bfloat16)."""
    if asked is None:
        if output_format in POOLED_FORMATS:
            return torch.float16
        return torch.float32 if output_format == "parquet" and compute == torch.bfloat16 else compute
    check_storage_dtype(output_format, asked)
    return getattr(torch, asked)


def part_name(output_format: str, rank: int, number: int) -> str:
    """The file a part's index rows name, relative to the output folder."""
    if output_format == "safetensors":
        return shard_name(rank, number)
    folder = FOLDERS[output_format][0]
    prefix = "metadata_" if output_format == "clip-retrieval" else ""
    return f"{folder}/{prefix}rank{rank:05d}-{number:05d}.parquet"


def embeddings_file(out_dir: Path, name: str) -> Path | None:
    """The ``.npy`` that goes with the metadata part ``name`` (relative to ``out_dir``) of an npy-parquet or
    clip-retrieval run; None for other parts."""
    path = Path(name)
    if path.parent.name != "metadata":
        return None
    if path.stem.startswith("metadata_"):
        return out_dir / "img_emb" / ("img_emb_" + path.stem.removeprefix("metadata_") + ".npy")
    return out_dir / "embeddings" / (path.stem + ".npy")


def existing_numbers(out_dir: Path, rank: int) -> list[int]:
    """Numbers of the parts of ``rank`` in any format's folder (so a new part never takes a used name)."""
    numbers = []
    for folder in {f for folders in FOLDERS.values() for f in folders}:
        if (out_dir / folder).is_dir():
            found = (PART_NAME.match(p.name) for p in (out_dir / folder).iterdir())
            numbers += [int(m.group(2)) for m in found if m and int(m.group(1)) == rank]
    return numbers


def owned_files(out_dir: Path, temporary_only: bool = False) -> list[Path]:
    """The part files (or only their temporary files) a run wrote in ``out_dir``, by their exact names."""
    paths = []
    for folder in sorted({f for folders in FOLDERS.values() for f in folders}):
        if (out_dir / folder).is_dir():
            for p in sorted((out_dir / folder).iterdir()):
                m = PART_NAME.match(p.name)
                if m and p.is_file() and (m.group(4) or not temporary_only):
                    paths.append(p)
    return paths


def part_files(out_dir: Path, name: str) -> list[Path]:
    """The files of the part whose index rows name ``name``: the file itself, and for npy-parquet and
    clip-retrieval the ``.npy`` that goes with its metadata (listed first: it is published first)."""
    npy = embeddings_file(out_dir, name)
    return [out_dir / name] if npy is None else [npy, out_dir / name]


def write_file(path: Path, data: Any, mode: int) -> None:
    """Write ``data`` (bytes, or a function that writes into a binary file) as the new file ``path`` with
    permissions ``mode``, synced. Every part file of every format but safetensors is written here (a test seam:
    looked up when called, so a test may replace it to simulate a full disk)."""
    with open(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        os.fchmod(f.fileno(), mode)
        f.flush()
        os.fsync(f.fileno())


def write_part(output_format: str, out_dir: Path, name: str, tensors: dict[str, torch.Tensor], rows, mode: int):
    """Write one npy-parquet or parquet part: ``tensors`` are ``KEY.patches``/``KEY.pooled``; ``rows`` the
    index rows of its items, in order. Written whole or not at all: on an error no file of the part is left."""
    pa, pq = _import_arrow()
    paths = part_files(out_dir, name)
    table = _metadata_table(pa, [_metadata(row, output_format) for row in rows])
    if output_format in POOLED_FORMATS:
        vectors = np.stack([_numpy(tensors[f"{row['key']}.pooled"]) for row in rows])  # (n, D)
        npy = io.BytesIO()  # numpy writes a real file with fwrite, whose errors lose their errno (a full disk)
        np.save(npy, vectors)
        contents: list[Any] = [npy.getbuffer(), lambda f: pq.write_table(table, f)]
    else:
        for column in ("patches", "pooled"):
            if any(f"{row['key']}.{column}" in tensors for row in rows):
                values = [_numpy(tensors[f"{row['key']}.{column}"]) for row in rows]  # (N, D) or (D,) each
                table = table.append_column(column, _vectors(pa, values))
        contents = [lambda f: pq.write_table(table, f)]
    tmps = [temporary_sibling(path) for path in paths]
    published: list[Path] = []
    try:
        for path, tmp, data in zip(paths, tmps, contents):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(tmp, data, mode)
        for path, tmp in zip(paths, tmps):
            publish_new(tmp, path)
            published.append(path)
    except BaseException:
        for path in published:  # an .npy whose metadata could not be published
            path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def part_keys(path: Path) -> set[str]:
    """The tensor names a parquet part holds, as a safetensors shard would name them (``KEY.grid_thw``,
    ``KEY.pooled``, ``KEY.patches``), for ``--resume``; an npy-parquet part also needs its whole ``.npy``."""
    pa, pq = _import_arrow()
    names = pq.read_schema(path).names
    keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()  # not the features: a resume reads no data
    npy = embeddings_file(path.parent.parent, f"{path.parent.name}/{path.name}")
    if npy is not None:
        rows = np.load(npy, mmap_mode="r").shape[0]
        if rows != len(keys):
            raise ValueError(f"{npy} holds {rows} embeddings; its metadata has {len(keys)} rows")
        columns = ["pooled"]
    else:
        columns = [c for c in ("patches", "pooled") if c in names]
    return {f"{key}.{c}" for key in keys for c in ("grid_thw", *columns)}


def _metadata(row: dict[str, Any], output_format: str) -> dict[str, Any]:
    out = {name: row.get(name) for name in METADATA_COLUMNS}
    out["id"] = str(row.get("id", row["path"]))
    if output_format == "clip-retrieval":  # clip-retrieval's name for it (its back end shows image_path, caption)
        out["image_path"] = row["path"]
    out.update({k: v for k, v in row.items() if k not in out and k not in ("shard", "status", "error")})
    return out


def _metadata_table(pa, records: list[dict[str, Any]]):
    """The metadata rows as an Arrow table, column by column as ``Table.from_pylist`` types them; a kept column
    Arrow cannot type (an integer past 64 bits, values of different types in one part) or Parquet cannot store
    (an empty mapping: a struct without fields) holds each value's JSON text instead of failing the whole run; a
    column with no value in this part is typed string, not null (pyarrow reads a folder of parts as one dataset
    with the first part's schema, and casts no type to null)."""
    columns = {}
    for name in dict.fromkeys(key for record in records for key in record):
        values = [record.get(name) for record in records]
        try:
            column = pa.array(values)
            if pa.types.is_null(column.type):  # Arrow casts no other type to null: the folder would not read
                column = pa.array(values, pa.string())  # as one dataset when a later part holds values
            if not _parquet_storable(pa, column.type):
                raise TypeError(f"column {name!r} of type {column.type}")
        except (pa.ArrowException, OverflowError, TypeError):
            column = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
        columns[name] = column
    return pa.table(columns)


def _parquet_storable(pa, kind) -> bool:
    """False for a type that holds a struct without fields, which Parquet refuses to write."""
    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(_parquet_storable(pa, kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _parquet_storable(pa, kind.value_type)
    return True


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype != torch.bfloat16, "storage_dtype() refuses bfloat16 for numpy and Arrow"
    return tensor.numpy()


def _vectors(pa, values: list[np.ndarray]):
    """One cell per item: ``(D,)`` -> fixed_size_list<D>; ``(N, D)`` -> list<fixed_size_list<D>> (N per item)."""
    width = values[0].shape[-1]
    flat = pa.array(np.concatenate([v.reshape(-1) for v in values]))  # numpy's dtype, float16 included
    vectors = pa.FixedSizeListArray.from_arrays(flat, width)
    if values[0].ndim == 1:
        return vectors
    offsets = pa.array(np.concatenate([[0], np.cumsum([v.shape[0] for v in values])]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, vectors)


def _import_arrow():
    try:
        import pyarrow as pa  # optional: the 'data' extra
        import pyarrow.parquet as pq  # optional: the 'data' extra
    except ImportError:
        raise ImportError(
            f"the npy-parquet and parquet outputs need pyarrow, which is not installed; {INSTALL_HINT}"
        ) from None
    return pa, pq
