"""The inputs of ``hevc-vit codec-assets`` as ``encode`` takes them: files, folders, globs, brace ranges, list
files, webdataset tar shards, tables (parquet/csv/tsv/jsonl with ``--path-column``/``--key-column``) and URLs,
expanded by ``encode``'s own readers into :class:`~hevc_vit.codec.assets.Job` objects for the codec runner.

Here, above both, because nothing below ``encode`` may import it (``pyproject.toml``'s import contracts). A local
``.jsonl`` stays the reference's job list (:func:`hevc_vit.codec.assets.read_job_list`: every field kept,
``exists: false`` skipped). Keys: a table row's ``--key-column`` as given (a bad or repeated one is a failed
row), else the stem of the file, the URL or the tar member, made unique in input order as plain files' are
(:func:`hevc_vit.codec.assets.expand_jobs`). A tar member or a URL is fetched by the job (``encode``'s
:func:`~hevc_vit.encode.readers.fetch.fetch`, with its timeouts and retries) into a temporary file for the
decoder. Folders, tar shards and URL folders contribute their videos only (images and other files are not
codec inputs); what cannot be found or read is a job with its error, a failed row of the index.

Hugging Face datasets (a ``datasets.Dataset`` or ``IterableDataset`` among the inputs, or ``--hf-dataset``'s
:class:`~hevc_vit.encode.readers.memory.DatasetInput`): one job per row, as a table's (:func:`dataset_jobs`).
The ``--path-column`` holds a path or URL (a string, decoded from there), or the video's bytes (``bytes``, a
``{"bytes", "path"}`` dict, or a ``datasets.Video`` column, read undecoded): a dataset stored on disk is read
by the job (its pickle names the Arrow files, so worker processes and Ray tasks read the row themselves), an
in-memory one's row bytes travel with the job. Keys: ``--key-column`` when the dataset has it, else the stem
of the row's path, else the row number; every other column is kept for the manifest."""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
from collections.abc import Sequence
from typing import Any

from hevc_vit.codec.assets import Job
from hevc_vit.encode.readers.expand import SourceOptions, expand_units
from hevc_vit.encode.readers.fetch import fetch
from hevc_vit.encode.readers.memory import DatasetColumn, DatasetInput, fetch_memory_row, is_dataset
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import InputSpec, RemoteFile, WorkUnit, is_url, json_value, split_tar_path
from hevc_vit.encode.readers.tables import table_layout, table_specs
from hevc_vit.encode.readers.tar import list_tar
from hevc_vit.media.kinds import VIDEO_EXTENSIONS

JOB_LIST = ".jsonl"


def fetch_bytes(spec: InputSpec, network: Network) -> bytes:
    """The bytes of a tar member or a URL (a ``Job.fetch``, bound with :func:`functools.partial`)."""
    data = fetch(spec.ref, [], network).data
    if data is None:
        raise ValueError(f"{spec.path} holds no bytes; expected a video file")
    return data


def _file_name(spec: InputSpec) -> str:
    """The file name of an input: a tar member's own name, a URL's or a path's last part."""
    path = spec.path
    if path.startswith(("tar://", "tar-quoted://")):
        path = split_tar_path(path)[0]
    return posixpath.basename(path.split("?", 1)[0].rstrip("/")) if is_url(path) else os.path.basename(path)


def _is_video(spec: InputSpec) -> bool:
    return os.path.splitext(_file_name(spec))[1].lower() in VIDEO_EXTENSIONS


def _job(spec: InputSpec, network: Network, path_column: str, key: str = "", fields: dict | None = None) -> Job:
    if spec.error:
        return Job(key, spec.path, fields or {path_column: spec.path}, spec.path, error=spec.error)
    fetcher = functools.partial(fetch_bytes, spec, network) if spec.ref is not None else None
    name = _file_name(spec)
    return Job(key, spec.path, fields or {path_column: spec.path}, spec.path, fetcher, name)


def _row_bytes(column: DatasetColumn, row: int, network: Network) -> bytes:
    """The bytes of a dataset row's video (a ``Job.fetch``): its bytes, or the file or URL its path names."""
    data = fetch_memory_row(column, row, network).data
    if data is None:
        raise ValueError(f"row {row} of the dataset's {column.column!r} column holds no video bytes or path")
    return data


def _given_bytes(data: bytes) -> bytes:
    return data


def _skipped(fields: dict) -> bool:
    """A row the reference's job list would skip: ``exists`` false (as a boolean or as text)."""
    return fields.get("exists", True) is False or fields.get("exists") in ("false", "False", "0")


def _open_dataset(value: Any, path_column: str) -> tuple[Any, str]:
    """``(Dataset, label)`` of a dataset input; an ``IterableDataset`` is written once to an Arrow cache."""
    dataset, label = (value.dataset, value.name) if isinstance(value, DatasetInput) else (value, "")
    kind = type(dataset).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        raise ValueError(f"a {kind} with splits {list(dataset)}; expected one split, e.g. dataset['train']")
    if kind == "IterableDataset":
        from datasets import Dataset  # optional: the 'data' extra (a dataset input means it is installed)

        feature = (dataset.features or {}).get(path_column)
        if type(feature).__name__ == "Video":  # keep the encoded bytes, not decoded frames
            dataset = dataset.cast_column(path_column, dataclasses.replace(feature, decode=False))
        dataset = Dataset.from_generator(_rows, gen_kwargs={"source": dataset}, features=dataset.features)
    elif kind != "Dataset":
        raise ValueError(f"a {kind} from the datasets library; expected a Dataset or an IterableDataset")
    return dataset, label or "dataset" + (f":{dataset.split}" if dataset.split else "")


def _rows(source):
    yield from source


def _stored_paths(videos: Any, column: str) -> list:
    """Per row, the path of a ``{"bytes", "path"}`` value (None for plain bytes, or no path), read from the
    Arrow chunks without touching the bytes (a dataset on disk is memory-mapped: they are not read here)."""
    chunks = videos.with_format("arrow")[:].column(column).chunks
    out: list = []
    for chunk in chunks:
        has_path = hasattr(chunk, "field") and chunk.type.get_field_index("path") >= 0
        out += chunk.field("path").to_pylist() if has_path else [None] * len(chunk)
    return out


def dataset_jobs(value: Any, path_column: str, key_column: str, network: Network) -> list[Job]:
    """One job per row of a Hugging Face dataset (see the module doc); rows with a false ``exists`` are
    skipped. ``ValueError`` naming the columns when ``path_column`` is not one."""
    dataset, label = _open_dataset(value, path_column)
    columns = dataset.column_names
    if path_column not in columns:
        raise ValueError(f"path_column={path_column!r} is not a column of the dataset {label}; it has {columns}")
    videos = dataset.select_columns([path_column])
    feature = videos.features[path_column]
    if type(feature).__name__ == "Video":  # read the encoded bytes; the decoder opens them
        videos = videos.cast_column(path_column, dataclasses.replace(feature, decode=False))
    paths = getattr(feature, "dtype", None) in ("string", "large_string")  # else bytes, or {bytes, path} dicts
    stored = videos[:][path_column] if paths else _stored_paths(videos, path_column)
    others = [c for c in columns if c != path_column]
    table = dataset.select_columns(others)[:] if others else {}
    on_disk = bool(dataset.cache_files)  # pickles as its Arrow files' names: each job reads its own row
    jobs = []
    for r in range(len(dataset)):
        fields = {c: json_value(table[c][r]) for c in others}
        if _skipped(fields):
            continue
        key = fields.get(key_column)
        key = "" if key is None else str(key)
        name = f"{label}[{r}]"
        if paths:
            path = stored[r]
            if not isinstance(path, str) or not path.strip():
                error = f"row {r}: the {path_column} column is {path!r}; expected a path or URL"
                jobs.append(Job(key, name, {**fields, path_column: path}, name, error=error))
                continue
            spec = InputSpec(path, ref=RemoteFile(path) if is_url(path) else None)
            jobs.append(_job(spec, network, path_column, key, {**fields, path_column: path}))
            continue
        column = DatasetColumn(videos, path_column)
        if on_disk:
            fetcher = functools.partial(_row_bytes, column, r, network)
        else:  # an in-memory table would be pickled whole with every job: the row's bytes travel instead
            fetcher = functools.partial(_given_bytes, _row_bytes(column, r, network))
        # the stored file's name keys a keyless row (its stem) and names the copy; else the row number, without
        # an extension: FFmpeg tells the container from the bytes
        file_name = posixpath.basename(stored[r]) if stored[r] else str(r)
        jobs.append(Job(key, name, {**fields, path_column: name}, name, fetcher, file_name))
    return jobs


def _table_jobs(unit: WorkUnit, path_column: str, key_column: str, network: Network) -> list[Job]:
    """One job per row of a table (or of one parquet row group): every column kept as the row's fields (the
    manifest's), ``exists: false`` rows skipped as in the reference's job list."""
    columns, _ = table_layout(unit.location, network)
    group = unit.group if unit.kind == "row_group" else None
    try:
        specs = table_specs(unit.location, path_column, columns, network, group, unit.start)
    except Exception as e:  # damaged since its layout was read: one failed row, as encode records it
        return [Job("", unit.name, {}, unit.name, error=f"cannot read this table: {type(e).__name__}: {e}")]
    jobs = []
    for spec in specs:
        fields = dict(spec.extra)
        if _skipped(fields):
            continue
        key = fields.get(key_column)
        key = "" if key is None else str(key)
        jobs.append(_job(spec, network, path_column, key, {**fields, path_column: spec.path}))
    return jobs


def _unit_jobs(unit: WorkUnit, searched: bool, path_column: str, key_column: str, network: Network) -> list[Job]:
    if unit.kind in ("table", "row_group"):
        return _table_jobs(unit, path_column, key_column, network)
    if unit.kind == "tar":
        specs = [s for s in list_tar(unit.location, network) if s.error or _is_video(s)]
    elif unit.kind == "item":
        spec = unit.spec
        if spec.error and not searched and not is_url(spec.path) and not os.path.lexists(spec.path):
            # a missing file named: keyed by its stem and reported by the decoder ("video X does not exist"), as
            # the codec runner reports a missing path it is given
            return [Job("", spec.path, {path_column: spec.path}, spec.path, name=os.path.basename(spec.path))]
        specs = [spec] if spec.error or not searched or _is_video(spec) else []
    else:
        raise ValueError(f"an input of kind {unit.kind!r}; codec-assets takes files, folders, tars, tables, URLs")
    return [_job(spec, network, path_column) for spec in specs]


def expand_codec_inputs(
    inputs: Sequence[Any],
    path_column: str = "video",
    key_column: str = "key",
    network: Network | None = None,
) -> list[str | Job]:
    """``inputs`` as the codec runner takes them: local ``.jsonl`` job lists as they are, everything else as
    :class:`Job` objects (see the module doc). ``inputs`` are strings (paths, patterns, URLs) or Hugging Face
    datasets. A table or dataset without ``path_column`` raises ``ValueError`` naming its columns (before
    anything is written)."""
    network = network or Network()
    sources = SourceOptions(path_column=path_column, network=network)
    out: list[str | Job] = []
    seen: set[str] = set()  # a video named twice (a folder and a glob over it) is one job, as in encode
    for arg in inputs:
        if is_dataset(arg):
            out += dataset_jobs(arg, path_column, key_column, network)
            continue
        arg = os.fspath(arg)
        if arg.lower().endswith(JOB_LIST) and os.path.isfile(arg):
            out.append(arg)
            continue
        # a folder or a pattern stands for many files, of which the videos are inputs; a file named is one
        searched = os.path.isdir(arg) or (is_url(arg) and arg.endswith("/")) or any(c in arg for c in "*?[{")
        for unit in expand_units([arg], sources=sources):
            for job in _unit_jobs(unit, searched, path_column, key_column, network):
                if not job.key and not job.error:  # a table's keyed rows may name one video twice
                    if job.video in seen:
                        continue
                    seen.add(job.video)
                out.append(job)
    return out
