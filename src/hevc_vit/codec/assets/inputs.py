"""The inputs of a codec-assets run, as jobs ``(key, video, fields)``: the reference's job list (a jsonl with
``video`` and ``key`` per line, ``exists: false`` skipped; other column names by option), plain video files,
folders (searched recursively for video extensions) and globs. Keys of plain files are their stems, made
unique in input order (``clip``, ``clip-2``, …; a suffix never takes another file's stem); keys from a
job list are kept as given (a bad or repeated one becomes a failed row when it is processed).

Inputs that are not local files (a tar shard's member, a URL: what ``hevc-vit codec-assets`` expands with
``encode``'s readers, which this package may not import) come as :class:`Job` objects carrying a ``fetch``
callable that returns the video's bytes; :func:`local_video` gives the decoder a temporary copy. A job with an
``error`` (an input that could not be found or listed) is a failed row with that reason."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hevc_vit.media.kinds import VIDEO_EXTENSIONS

JOB_LIST_EXTENSIONS = (".jsonl",)
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Job:
    """One video to process.

    key: its folder name (empty, with a ``name``: the stem of the name, made unique as a plain file's is; empty
    without one: a failed row); video: its name in the index; fields: the job-list line (kept in the manifest);
    source: where it was listed; fetch: returns the video's bytes when ``video`` is not a local file (picklable:
    it travels to worker processes and Ray tasks); name: its file name (the extension tells the container);
    error: why the input could not be found or listed (the job is a failed row)."""

    key: str
    video: str
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    fetch: Callable[[], bytes] | None = None
    name: str = ""
    error: str = ""


@contextmanager
def local_video(job: Job) -> Iterator[str]:
    """A local path of the job's video: ``video`` itself, or a temporary copy of the fetched bytes (named with
    the extension of ``name``, removed on exit)."""
    if job.fetch is None:
        yield job.video
        return
    data = job.fetch()
    suffix = Path(job.name or job.video).suffix
    with tempfile.TemporaryDirectory(prefix="hevc-vit-codec-") as folder:
        path = os.path.join(folder, "video" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        yield path


def read_job_list(path: str | os.PathLike, key_column: str = "key", path_column: str = "video") -> list[Job]:
    """The jobs of a jsonl job list; a line that is not a JSON object or lacks ``path_column`` is a
    ``ValueError`` naming the file and line. A missing or empty key is the video's stem."""
    jobs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # the whole list is refused: its keys are unknown past here
                raise ValueError(f"{path} line {number} is not valid JSON ({e}); expected one object a line") from None
            if not isinstance(record, dict) or not isinstance(record.get(path_column), str):
                raise ValueError(f"{path} line {number} has no string {path_column!r}; expected a video path there")
            if not record.get("exists", True):  # the reference skips any false value
                continue
            video = record[path_column]
            key = record.get(key_column)
            key = Path(video).stem if key is None or key == "" else key
            jobs.append(Job(key if isinstance(key, str) else str(key), video, record, f"{path}:{number}"))
    return jobs


def _files_of(arg: str) -> list[str]:
    if any(c in arg for c in _GLOB_CHARS) and not os.path.exists(arg):
        return sorted(glob.glob(arg, recursive=True))
    if os.path.isdir(arg):
        found = []
        for folder, dirs, names in os.walk(arg):
            dirs.sort()
            found += [os.path.join(folder, n) for n in sorted(names) if Path(n).suffix.lower() in VIDEO_EXTENSIONS]
        return found
    return [arg]  # a plain file, or a missing one (a failed row says so)


def expand_jobs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike | Job],
    key_column: str = "key",
    path_column: str = "video",
) -> list[Job]:
    """Every input as jobs, in the order given (see the module doc). ``Job`` objects pass through (one with a ``name``
    but no key and no error is keyed by the stem of its name, as a plain file is)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike, Job)) else list(inputs)
    jobs: list[Job] = []
    plain: list[tuple[int, str]] = []  # (index in jobs, path) of plain files, keyed after all are known
    for item in items:
        if isinstance(item, Job):
            if not item.key and item.name and not item.error:  # keyed by its name's stem, as a plain file is
                plain.append((len(jobs), item.name))
            jobs.append(item)
            continue
        arg = os.fspath(item)
        if arg.lower().endswith(JOB_LIST_EXTENSIONS) and os.path.isfile(arg):
            jobs += read_job_list(arg, key_column, path_column)
            continue
        matches = _files_of(arg)
        if not matches:
            raise ValueError(f"input {arg!r} matches no file; expected a video, a folder, a glob or a .jsonl job list")
        for path in matches:
            plain.append((len(jobs), path))
            jobs.append(Job("", path, {path_column: path}, path))  # keyed below
    stems = [Path(path).stem or "video" for _, path in plain]
    taken = {job.key for job in jobs if job.key} | set(stems)  # a file's own stem is never another's suffix
    seen: set[str] = set()
    for (index, _path), stem in zip(plain, stems):
        key, n = stem, 1
        while key in seen or (key != stem and key in taken):
            n += 1
            key = f"{stem}-{n}"
        seen.add(key)
        jobs[index] = replace(jobs[index], key=key)
    return jobs
