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
codec inputs); what cannot be found or read is a job with its error, a failed row of the index."""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Sequence

from hevc_vit.codec.assets import Job
from hevc_vit.encode.readers.expand import SourceOptions, expand_units
from hevc_vit.encode.readers.fetch import fetch
from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import InputSpec, WorkUnit, is_url, split_tar_path
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
        if fields.get("exists", True) is False or fields.get("exists") in ("false", "False", "0"):
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
    inputs: Sequence[str],
    path_column: str = "video",
    key_column: str = "key",
    network: Network | None = None,
) -> list[str | Job]:
    """``inputs`` as the codec runner takes them: local ``.jsonl`` job lists as they are, everything else as
    :class:`Job` objects (see the module doc). A table without ``path_column`` raises ``ValueError`` naming its
    columns (before anything is written)."""
    network = network or Network()
    sources = SourceOptions(path_column=path_column, network=network)
    out: list[str | Job] = []
    seen: set[str] = set()  # a video named twice (a folder and a glob over it) is one job, as in encode
    for arg in inputs:
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
