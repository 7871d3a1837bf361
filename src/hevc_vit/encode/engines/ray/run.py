"""``encode(..., engine="ray")``: the output folder of ``hevc-vit encode``, written by a Ray Data pipeline.

On the driver, as the local engine's rank 0 does: the folder is claimed (its lock held until the run returns)
and prepared (``--resume``/``--overwrite`` rules, ``encode_config.json``), the model loaded once (its settings
recorded; the actors receive it through Ray's object store, so the checkpoint need not be on every node) and
the inputs listed. The inputs not done yet become a dataset that is decoded, encoded and written by the stages
of :mod:`.stages` (the inputs are read where the decoding runs: local paths must be on a filesystem every node
sees, or be URLs; the parts are written on the driver's node); each block's rows land in an index file of its
own, and the driver merges them into ``index.jsonl`` once, in input order, one row per input. Parts left by an
attempt that Ray retried differently (no row names them) are removed.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hevc_vit.encode.engines.pipeline import Tally, list_run_share, memory_sources, prepare_folder, shows_progress
from hevc_vit.encode.engines.ray.cluster import (
    actors_not_started,
    bound_actor_start,
    import_ray,
    quiet_data,
    ray_session,
)
from hevc_vit.encode.engines.ray.dataset import DECODE_ROWS, Stages, prepare
from hevc_vit.encode.engines.ray.stages import FAULT_ENV, ORDINAL, DoneKeys, load_specs, write_block
from hevc_vit.encode.model.loader import run_settings
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.folder import claim_out_dir, reporting_full_disk
from hevc_vit.encode.output.formats import embeddings_file, owned_files, storage_dtype
from hevc_vit.encode.output.index import merge_index
from hevc_vit.encode.output.result import EncodeResult
from hevc_vit.encode.readers.expand import SourceOptions
from hevc_vit.encode.readers.memory import collect_memory
from hevc_vit.encode.readers.units import Share, first_listings, ordered_paths


def encode_folder(
    inputs: Any = None,
    out_dir: str | os.PathLike | None = None,
    options: EncodeOptions | None = None,
    *,
    batch_size: int | None = None,
) -> EncodeResult:
    """What ``encode(inputs, out_dir, options)`` does, on Ray (``options.ray_address``: the cluster; None: the
    Ray instance this process has, else a local one). batch_size: items per model call, packed into forwards
    of at most ``max_tokens`` patches (default: 4 forwards' worth of the largest item the processor makes)."""
    options = (options or EncodeOptions()).replace(engine="ray")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("engine='ray' was started under torchrun; start it once, with Ray spreading the work")
    import_ray()
    _refuse_process_local(inputs)
    sources = SourceOptions.of(options)
    inputs, memory = collect_memory(inputs, options.image_column, sources.keep_columns)
    say = options.say
    lock = claim_out_dir(out_dir, options.resume, options.overwrite, say)
    try:
        with ray_session(options.ray_address, options.ray_timeout):
            return _encode_claimed(lock.folder, inputs, memory, options, say, batch_size)
    finally:
        lock.release()


def _refuse_process_local(inputs: Any) -> None:
    """A ``memory://`` file lives in this process alone: Ray's decoding tasks, in other processes, cannot read it."""
    given = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs or [])
    local = [str(i) for i in given if isinstance(i, (str, os.PathLike)) and str(i).startswith("memory://")]
    if local:
        raise ValueError(
            f"engine='ray' with {local[:3]}: a memory:// file exists only in this process, and Ray decodes in other "
            f"processes; write the files where every node can read them (a path, s3://, gs://, ...) or use the "
            f"local engine"
        )


def _encode_claimed(folder: Path, inputs, memory: list, options: EncodeOptions, say, batch_size) -> EncodeResult:
    encoder, device, dtype = prepare(options, say)
    settings = run_settings(options, encoder, dtype, 1, with_weights=True)
    sources = SourceOptions.of(options)
    with reporting_full_disk(folder):
        plan = prepare_folder(inputs, folder, options.resume, options.overwrite, settings, say, sources)
    start = time.perf_counter()
    share = list_run_share(plan, 0, 1, options, memory_sources(inputs))
    todo = _todo(share, plan.done)
    before = set(owned_files(folder))
    result = EncodeResult(out_dir=folder.resolve(), skipped=len(plan.done), repairs=list(plan.repairs))
    result.output_format = options.output_format
    show = shows_progress(options)
    tally = _Tally(len(todo), show, "encode (ray)")
    try:
        with reporting_full_disk(folder):
            if todo:
                stages = Stages(options, encoder, device, dtype, memory, batch_size)
                storage = storage_dtype(options.output_format, options.storage_dtype, dtype)
                quiet_data()
                bound_actor_start()
                ray = import_ray()
                with _progress(tally, show) as done_keys:
                    try:
                        for counts in _pipeline(todo, folder, stages, storage, done_keys).iter_rows():
                            tally.add(int(counts["encoded"]), int(counts["failed"]), int(counts["tokens"]))
                    except ray.exceptions.GetTimeoutError as e:  # the model actors did not start in time
                        raise actors_not_started(e) from e
            paths = ordered_paths(plan.units, share.listed)
            result.count(merge_index(folder, paths), paths, plan.done)  # the counts the index holds
            _remove_unnamed_parts(folder, before, result.rows)
            # the parts this run's rows name (a write retried after it published counts once)
            new_rows = [row for row in result.rows if row.get("shard") and row["path"] not in plan.done]
            result.shards = len({row["shard"] for row in new_rows})
    finally:
        tally.close()
    result.tokens = tally.counts()[2]
    result.seconds = time.perf_counter() - start
    return result


def _todo(share: Share, done: set[str]) -> list[dict[str, Any]]:
    """A dataset row per input not done yet (first listing of a path only): its shard key, its source fields and
    its spec."""
    return [
        {
            "key": share.keys[j],
            ORDINAL: j,  # names the part of the block it leads
            "extra": json.dumps(share.specs[j].extra),
            "spec": pickle.dumps(share.specs[j]),
        }
        for j in first_listings(share.specs)
        if share.specs[j].path not in done  # failed listings too: the decode stage makes their rows
    ]


def _pipeline(todo: list[dict[str, Any]], folder: Path, stages: Stages, storage: torch.dtype, done_keys: Any):
    """Rows of the inputs to do -> decoded -> encoded -> written: one row of counts per block written."""
    import ray  # optional: the 'ray' extra

    options = stages.options
    blocks = max(1, -(-len(todo) // DECODE_ROWS))
    rows = ray.data.from_items(todo, override_num_blocks=blocks)
    decoded = stages.decode(rows, load_specs, {"load": stages.load, "cwd": os.getcwd()})
    write = {"out_dir": str(folder.resolve()), "output_format": options.output_format, "storage": storage}
    fault = os.environ.get(FAULT_ENV)
    # the writes run on this node, the folder's: it need not be on a filesystem the other nodes share
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    # a part holds up to shard_size_mb of features (many model calls' results), not one model call's
    return stages.model(decoded, progress=done_keys).map_batches(
        write_block,
        fn_kwargs={**write, "fault": fault},
        batch_size=stages.part_rows,
        num_cpus=1,
        label_selector=here,
    )


class _Tally(Tally):
    """The run's counts (from the written parts) and a bar of the items done of the total, which follows the model
    stage (:meth:`show_at_least`, from the progress thread) or the written parts, whichever is further."""

    def __init__(self, total: int, show: bool, desc: str):
        super().__init__(total, show, desc)
        self.lock = threading.Lock()

    def add(self, encoded: int, failed: int, tokens: int) -> None:
        self.encoded, self.failed, self.tokens = self.encoded + encoded, self.failed + failed, self.tokens + tokens
        self.show_at_least(self.encoded + self.failed)

    def show_at_least(self, done: int) -> None:
        with self.lock:
            step = min(done, self.bar.total) - self.bar.n
            if step > 0:
                self.bar.update(step)


@contextmanager
def _progress(tally: _Tally, show: bool) -> Iterator[Any]:
    """With ``show``: a :class:`.stages.DoneKeys` actor the model stage tells what it finished, and a thread
    that moves the bar to its count (items encoded or failed, of the total) twice a second; the written parts'
    counts (``tally.add``) still make the totals. Yields the actor (None without ``show``)."""
    if not show:
        yield None
        return
    import ray  # optional: the 'ray' extra

    done_keys = ray.remote(num_cpus=0)(DoneKeys).remote()
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(0.5):
            try:
                count = ray.get(done_keys.count.remote(), timeout=10)
            except Exception:  # a busy or lost actor: the bar waits for the next try
                continue
            tally.show_at_least(count)

    thread = threading.Thread(target=follow, name="ray-progress", daemon=True)
    thread.start()
    try:
        yield done_keys
    finally:
        stop.set()
        thread.join(timeout=15)
        ray.kill(done_keys)


def _remove_unnamed_parts(folder: Path, before: set[Path], rows: list[dict[str, Any]]) -> None:
    """Remove the parts this run wrote that no index row names (an attempt Ray retried with other rows)."""
    named = set()
    for row in rows:
        shard = row.get("shard") or ""
        if shard:
            named.add(folder / shard)
            npy = embeddings_file(folder, shard)  # npy-parquet, clip-retrieval: the embeddings of the metadata
            if npy is not None:
                named.add(npy)
    for path in set(owned_files(folder)) - before - named:
        path.unlink(missing_ok=True)
