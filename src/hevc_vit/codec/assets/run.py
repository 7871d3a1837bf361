"""A codec-assets run: every input to ``OUT/assets/<key>/``, accounted for in ``OUT/index.jsonl`` (one row per
job: ``ok`` or ``failed`` with its reason) and listed in ``OUT/manifest.jsonl`` (one training record per
finished video: the job's fields plus ``images`` and ``positions_thw``, the shape the reference's ``train.py``
reads). The run's settings are recorded in ``OUT/codec_assets.json``; ``resume`` skips finished keys and
refuses other settings. Videos are processed in this process (``workers=0``) or in worker processes.

Shards (the reference's ``--num_shards/--shard_id``; torchrun ranks via :func:`launcher_shard`): shard ``i`` of
``n`` processes jobs ``j`` with ``j % n == i`` into the same ``OUT`` and writes ``index-{i:05d}-of-{n:05d}.jsonl``
and ``manifest-{i:05d}-of-{n:05d}.jsonl``; keys are checked for repeats over the whole job list, so every
shard decides alike. :func:`read_index` reads all of a folder's index rows."""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from hevc_vit.codec.assets.inputs import Job, expand_jobs, local_video
from hevc_vit.codec.assets.mosaics import render_sheet
from hevc_vit.codec.assets.read import RUN_RECORD
from hevc_vit.codec.assets.settings import FORMAT, AssetSettings
from hevc_vit.codec.assets.video import VideoAssets, compute_assets
from hevc_vit.codec.assets.writer import asset_dir, check_key, is_done, mosaic_name, write_asset_folder
from hevc_vit.files import write_atomic, write_json_atomic
from hevc_vit.runtime.ray_connect import init_checked, start_loopback_instance

INDEX = "index.jsonl"
MANIFEST = "manifest.jsonl"
PREVIEWS = "previews"
ENGINES = ("local", "ray")
# how long the main process waits on its worker processes: each video's timeout (this when none is given) plus a
# worker's start and its row's way back, times the videos each worker has in turn
UNTIMED_VIDEO_S = 1800.0
WORKER_MARGIN_S = 60.0
RAY_CONNECT_S = 30.0  # seconds a Ray cluster at ray_address has to answer as one (encode's --ray-timeout default)


@dataclass
class AssetsReport:
    """The rows of ``index.jsonl`` in input order, and where the run wrote."""

    out: Path
    rows: list[dict]

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] != "ok"]

    @property
    def ok(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "ok"]


class AssetTimeout(TimeoutError):
    """A video took longer than the run's ``timeout``."""


def _on_alarm(signum, frame):
    raise AssetTimeout("timed out")


def process_job(
    job: Job, out: str, settings: AssetSettings, timeout: float | None = None, preview: bool = False
) -> dict:
    """One job's index row; the asset folder is written unless it failed. ``timeout`` (seconds; armed with
    SIGALRM, so only in a worker process) turns a hung video into a failed row. ``preview``: also draw the
    selection beside the mosaics to ``OUT/previews/<key>.png`` (outside ``assets/``, where the lmms-eval lookup
    takes any image of a folder)."""
    clock = time.perf_counter()
    row = dict(key=job.key, video=job.video, source=job.source)
    copy = ""  # the temporary copy of a fetched video
    alarm = bool(timeout) and threading.current_thread() is threading.main_thread()  # signals: main thread only
    if alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        if job.error:
            raise ValueError(job.error)
        folder = asset_dir(out, job.key)
        with local_video(job) as path:
            copy = path
            assets = compute_assets(path, settings, keep_squares=preview)
        if timeout and time.perf_counter() - clock > timeout:  # the alarm's exception can be swallowed (e.g. in a
            raise AssetTimeout("timed out")  # finaliser): the clock decides before anything is written
        timings = write_asset_folder(folder, assets, settings, job.video, job.key)
        row.update(status="ok", asset_dir=str(folder), tokens=int(len(assets.positions)), timings=timings)
        if preview:
            row["preview"] = str(write_preview(Path(out), job.key, assets, settings))
    except AssetTimeout:
        row.update(status="failed", error=f"video {job.video} took longer than timeout={timeout}s")
    except Exception as e:  # every input is accounted for: its error becomes the row's reason
        error = f"{type(e).__name__}: {e}"
        # a temporary copy's path means nothing to the user: the input's name stands for it
        row.update(status="failed", error=error.replace(copy, job.video) if copy else error)
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    row["seconds"] = round(time.perf_counter() - clock, 6)
    return row


def write_preview(out: Path, key: str, assets: VideoAssets, settings: AssetSettings) -> Path:
    """``OUT/previews/<key>.png``: :func:`render_sheet` of the video's prepared frames and mosaics."""
    sheet = render_sheet(assets.squares, assets.positions, assets.mosaics, settings.patch_size)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    path = out / PREVIEWS / f"{check_key(key)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


def manifest_record(row: dict, job: Job, settings: AssetSettings) -> dict:
    """The training record of a finished job: its fields, ``images`` (the mosaic paths) and ``positions_thw``."""
    folder = Path(row["asset_dir"]).resolve()
    images = [str(folder / mosaic_name(i, settings.mosaic_format)) for i in range(settings.num_images)]
    return {**job.fields, "images": images, "positions_thw": str(folder / "positions_thw.npy")}


def _check_run_record(out: Path, settings: AssetSettings, resume: bool, index: str) -> None:
    """Refuse settings other than the folder's run's, and a second run of a shard without ``resume`` (its
    ``index`` file exists); the shards of one run share the record."""
    record = out / RUN_RECORD
    if not record.exists():
        return
    if not resume and (out / index).exists():
        raise ValueError(
            f"{out} already holds a codec-assets run ({index}); pass resume=True (--resume) to continue it, "
            "or choose a new output folder"
        )
    try:
        recorded = json.loads(record.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{record} is unreadable ({e}); expected the run's settings there") from None
    if not settings.same_as(recorded):
        changed = settings.differences(recorded if isinstance(recorded, dict) else {})
        raise ValueError(
            f"{out} was written with other settings ({', '.join(changed)} differ); resume needs the same settings, "
            "or choose a new output folder"
        )


def launcher_shard() -> tuple[int, int]:
    """``(shard_id, num_shards)`` of this process under torchrun (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard_names(shard_id: int, num_shards: int) -> tuple[str, str]:
    """The index and manifest file names of a shard (``index.jsonl`` and ``manifest.jsonl`` unsharded)."""
    if num_shards == 1:
        return INDEX, MANIFEST
    tail = f"-{shard_id:05d}-of-{num_shards:05d}.jsonl"
    return "index" + tail, "manifest" + tail


def read_index(out: str | os.PathLike) -> list[dict]:
    """Every index row of ``out``, over all its shards' index files (in file-name order)."""
    names = sorted(Path(out).glob("index*.jsonl"))
    return [json.loads(line) for name in names for line in name.read_text(encoding="utf-8").splitlines() if line]


def _triage(jobs: list[Job], out: Path, settings: AssetSettings, resume: bool) -> tuple[dict[int, dict], list[int]]:
    """Rows decided without decoding (bad or repeated keys, finished folders) and the job numbers to process."""
    rows: dict[int, dict] = {}
    todo: list[int] = []
    first: dict[str, int] = {}
    for n, job in enumerate(jobs):
        base = dict(key=job.key, video=job.video, source=job.source)
        if job.error:  # not found or not listed: nothing to decode, and its key (if any) claims no folder
            rows[n] = {**base, "status": "failed", "error": job.error}
            continue
        try:
            folder = asset_dir(out, check_key(job.key))
        except ValueError as e:
            rows[n] = {**base, "status": "failed", "error": f"ValueError: {e}"}
            continue
        if job.key in first:
            other = jobs[first[job.key]]
            rows[n] = {
                **base,
                "status": "failed",
                "error": f"ValueError: duplicate key {job.key!r}: {other.source or other.video} has it too; "
                "expected one video per key",
            }
            continue
        first[job.key] = n
        if resume and is_done(folder, settings):
            rows[n] = {**base, "status": "ok", "asset_dir": str(folder), "resumed": True, "tokens": settings.tokens}
        else:
            todo.append(n)
    return rows, todo


def _failed(job: Job, error: str) -> dict:
    return dict(key=job.key, video=job.video, source=job.source, status="failed", error=error)


def _run_on_ray(
    jobs: list[Job], todo: list[int], out: Path, settings: AssetSettings, timeout, preview: bool, address
) -> dict[int, dict]:
    """The rows of ``todo``, one Ray task each (1 CPU, no retry: a failure is the row's reason). The cluster at
    ``address`` must answer within ``RAY_CONNECT_S``; a local instance listens on the loopback only. The driver
    waits on the tasks as on worker processes (see ``UNTIMED_VIDEO_S``), the cluster's CPUs a video each, then
    cancels the rest and fails their rows."""
    import ray  # optional: only engine="ray" needs it

    started = not ray.is_initialized()
    if started and address:
        init_checked(ray, address, RAY_CONNECT_S)
    elif started:
        start_loopback_instance(ray)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(process_job)
        refs = {n: task.remote(jobs[n], str(out.resolve()), settings, timeout, preview) for n in todo}
        cpus = max(1, int(ray.cluster_resources().get("CPU", 0)))
        bound = ((timeout or UNTIMED_VIDEO_S) + WORKER_MARGIN_S) * math.ceil(len(todo) / cpus)
        deadline = time.monotonic() + bound
        rows = {}
        for n, ref in refs.items():
            ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # never scheduled (no free CPU on the cluster) or its worker is stuck: end it
                ray.cancel(ref, force=True)
                error = (
                    f"no answer from the Ray task of this video within {bound:g} s (timeout={timeout} per video, "
                    f"{len(todo)} videos on {cpus} CPUs); the cluster did not run it or its worker is stuck: see "
                    f"`ray status` for free CPUs, then run again with resume"
                )
                rows[n] = _failed(jobs[n], f"TimeoutError: {error}")
                continue
            try:
                rows[n] = ray.get(ref)  # ready: returns at once
            except ray.exceptions.RayError as e:  # the worker died or the task could not run
                rows[n] = _failed(jobs[n], f"{type(e).__name__}: {e}")
        return rows
    finally:
        if started:
            ray.shutdown()


def _run_in_workers(
    jobs: list[Job], todo: list[int], out: Path, settings: AssetSettings, workers: int, timeout, preview: bool
) -> dict[int, dict]:
    """The rows of ``todo`` from ``workers`` processes, every wait on them bounded (see ``UNTIMED_VIDEO_S``)."""
    # fresh interpreters, never fork: a forked child inherits locks that other threads of this process held
    # (FFmpeg's, OpenMP's) and its decoder then waited on one forever (seen in the test suite)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    size = min(workers, len(todo))
    bound = ((timeout or UNTIMED_VIDEO_S) + WORKER_MARGIN_S) * math.ceil(len(todo) / size)
    deadline = time.monotonic() + bound
    rows: dict[int, dict] = {}
    pool = ProcessPoolExecutor(max_workers=size, mp_context=multiprocessing.get_context(method))
    futures = {n: pool.submit(process_job, jobs[n], str(out), settings, timeout, preview) for n in todo}
    try:
        for n, future in futures.items():
            try:
                rows[n] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except BrokenProcessPool as e:  # a worker died (e.g. a decoder crash): the pool's videos fail
                error = f"a worker process died while this video was queued or running ({e})"
                rows[n] = _failed(jobs[n], f"BrokenProcessPool: {error}")
            except FuturesTimeout:
                error = f"no answer from the worker processes within {bound:.0f} s (timeout={timeout} per video)"
                rows[n] = _failed(jobs[n], f"TimeoutError: {error}")
    finally:
        stuck = [f for f in futures.values() if not f.done()]
        if stuck:  # shutdown would wait for a stuck worker forever: end them (the executor keeps no public handle)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
        pool.shutdown(wait=not stuck, cancel_futures=True)
    return rows


def write_assets(
    inputs: str | os.PathLike | Sequence[str | os.PathLike | Job],
    out: str | os.PathLike,
    settings: AssetSettings | None = None,
    *,
    key_column: str = "key",
    path_column: str = "video",
    workers: int = 0,
    resume: bool = False,
    timeout: float | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    preview: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
) -> AssetsReport:
    """Write the codec assets of ``inputs`` under ``out`` (see the module doc) and return the index rows.

    inputs: video files, folders, globs, ``.jsonl`` job lists (``path_column`` / ``key_column``, ``exists: false``
    skipped) or :class:`Job` objects. workers: 0 processes videos here, ``n`` in ``n`` worker processes (``timeout``
    seconds per video there; the main process waits on them at most that, or ``UNTIMED_VIDEO_S``, plus
    ``WORKER_MARGIN_S`` per video in turn, then fails the rest). shard_id / num_shards: process only the jobs ``j``
    with ``j % num_shards == shard_id`` (see the module doc); the report holds this shard's rows. Failed videos are
    rows with ``status: failed`` and an ``error``; a broken job list, or settings other than a resumed run's, raise
    ``ValueError`` before anything is written. preview: draw each video's selection beside its mosaics
    (:func:`write_preview`). engine: ``local`` (this process and ``workers``) or ``ray`` (one task a video on the
    Ray cluster at ``ray_address``, else a local instance on the loopback address; ``OUT`` must be on a filesystem
    every node sees).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; expected one of {ENGINES}")
    settings = settings or AssetSettings()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r}; expected 0 (this process) or a number of worker processes")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards={num_shards!r}; expected a positive integer")
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id!r}; expected an integer from 0 to num_shards - 1 = {num_shards - 1}")
    out = Path(out)
    jobs = expand_jobs(inputs, key_column, path_column)
    _check_run_record(out, settings, resume, shard_names(shard_id, num_shards)[0])
    (out / "assets").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_RECORD, dict(format=FORMAT, settings=settings.as_dict()))
    rows, todo = _triage(jobs, out, settings, resume)
    mine = [n for n in range(len(jobs)) if n % num_shards == shard_id]
    todo = [n for n in todo if n % num_shards == shard_id]
    if engine == "ray":
        rows.update(_run_on_ray(jobs, todo, out, settings, timeout, preview, ray_address))
    elif workers == 0 or len(todo) <= 1:
        for n in todo:
            rows[n] = process_job(jobs[n], str(out), settings, preview=preview)
    else:
        rows.update(_run_in_workers(jobs, todo, out, settings, workers, timeout, preview))
    ordered = [rows[n] for n in mine]
    index, manifest = shard_names(shard_id, num_shards)
    lines = (json.dumps(row, sort_keys=True, allow_nan=False) + "\n" for row in ordered)
    write_atomic(out / index, "".join(lines).encode("utf-8"))
    records = [manifest_record(rows[n], jobs[n], settings) for n in mine if rows[n]["status"] == "ok"]
    write_atomic(out / manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    return AssetsReport(out, ordered)
