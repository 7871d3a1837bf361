"""One ``hevc-vit encode`` run, per rank: claim the output folder, load the model, agree on the plan, encode
this rank's share, then gather the totals and merge the index.

Under ``torchrun`` (or with ``torch.distributed`` initialised) rank 0 expands the inputs to work units (a file,
a tar shard, a parquet row group, ...: :mod:`hevc_vit.encode.readers.units`) and unit ``u`` goes to rank
``u % world_size``, which lists it into items; every rank writes its own shards and index rows, and rank 0 merges
the index after a barrier. Rank 0 alone holds the folder's lock and decides the plan; an error it meets reaches
every rank with the plan, so no rank waits forever. The model stage returns each forward's results
(:mod:`hevc_vit.encode.model.forward`); this engine hands them to the shard writer and counts them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hevc_vit.encode.decode.workers import default_workers, load_items
from hevc_vit.encode.engines.distributed import Ranks
from hevc_vit.encode.engines.pipeline import (
    RunPlan,
    Tally,
    encode_groups,
    list_run_share,
    load_options,
    memory_sources,
    prepare_folder,
    shows_progress,
)
from hevc_vit.encode.model.forward import EncodedItem, GroupEncoder
from hevc_vit.encode.model.loader import Encoder, prepare_encoder, run_settings
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.folder import claim_out_dir, reporting_full_disk
from hevc_vit.encode.output.formats import storage_dtype
from hevc_vit.encode.output.index import failed_row, merge_index
from hevc_vit.encode.output.result import EncodeResult
from hevc_vit.encode.output.shards import ShardWriter
from hevc_vit.encode.readers.expand import SourceOptions
from hevc_vit.encode.readers.memory import MemorySource, collect_memory
from hevc_vit.encode.readers.units import Share, items_to_encode, ordered_paths
from hevc_vit.runtime.devices import describe_dtype_choice, resolve_device, resolve_dtype


def encode_local(inputs: Any, out_dir: str | os.PathLike | None, options: EncodeOptions) -> EncodeResult:
    """What ``encode(inputs, out_dir, options)`` does in this process (one rank of ``torchrun``, or the only one);
    :func:`hevc_vit.encode.api.encode` checks the options and chooses this engine."""
    # one path or object is one input; objects and datasets stay in this process's memory, read by row
    inputs, memory = collect_memory(inputs, options.image_column, SourceOptions.of(options).keep_columns)
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = Run(options, device, resolve_dtype(options.dtype, device), Ranks.setup(device), memory)
    run.sources = memory_sources(inputs)
    try:
        return _encode_claimed(run, inputs, out_dir)
    finally:
        run.ranks.close()


@dataclass
class Run:
    """What every step of a run needs: the options, the device and dtype resolved, this process's rank."""

    options: EncodeOptions
    device: torch.device
    dtype: torch.dtype
    ranks: Ranks
    memory: list = field(default_factory=list)  # in-memory inputs (objects, datasets), by number: every rank's own
    sources: dict[int, MemorySource] = field(default_factory=dict)  # their rows' names, by number

    def say(self, message: str) -> None:
        """A notice for people: rank 0 only, to ``options.log`` (default: stderr)."""
        if self.ranks.rank == 0:
            self.options.say(message)


def _encode_claimed(run: Run, inputs: Sequence[str | os.PathLike] | None, out_dir) -> EncodeResult:
    """Rank 0 takes the output folder (an exclusive lock, held until the run returns) before anything is
    checked, loaded or written; a refusal reaches every rank with the plan."""
    lock, refusal = None, None
    if run.ranks.rank == 0:
        try:
            lock = claim_out_dir(out_dir, run.options.resume, run.options.overwrite, run.say)
        except (ValueError, OSError) as e:  # refused, or the folder cannot be made
            if not run.ranks.active:
                raise
            refusal = RunPlan.refused(e)
    try:
        return _encode_in(run, inputs, lock.folder if lock else None, refusal)
    finally:
        if lock is not None:
            lock.release()


def _encode_in(run: Run, inputs, folder: Path | None, refusal: RunPlan | None) -> EncodeResult:
    if run.options.dtype in (None, "auto"):
        run.say(describe_dtype_choice(run.device))  # which dtype "auto" took on this machine, and why
    encoder = prepare_encoder(run.options, run.device, run.dtype, run.say)
    settings = run_settings(run.options, encoder, run.dtype, run.ranks.world, with_weights=run.ranks.rank == 0)
    plan = _agree_on_plan(run, inputs, folder, settings, refusal)
    with reporting_full_disk(Path(plan.out_dir)):
        tally, shards, share = _encode_share(run, encoder, plan)
        return _gather(run, plan, tally, shards, share)


def _agree_on_plan(run: Run, inputs, folder: Path | None, settings: dict[str, Any], refusal: RunPlan | None):
    """Rank 0 decides the folder, the inputs and what is done; every rank follows, or raises rank 0's error."""
    plan = refusal
    if run.ranks.rank == 0 and plan is None:
        try:
            with reporting_full_disk(folder):
                options = run.options
                plan = prepare_folder(
                    inputs, folder, options.resume, options.overwrite, settings, run.say, SourceOptions.of(options)
                )
        except (ValueError, OSError, ImportError) as e:  # ImportError: a URL in a list needs a missing package
            if not run.ranks.active:
                raise
            plan = RunPlan.refused(e)
    plan = run.ranks.broadcast(plan)
    plan.raise_error()
    return plan


def _encode_share(run: Run, encoder: Encoder, plan: RunPlan) -> tuple[Tally, int, Share]:
    """This rank's units listed into items, which are loaded (in worker processes), grouped to the token budget,
    encoded and written; returns the tally, the number of shards written and the listing. After an error what
    finished is kept."""
    rank, world, options = run.ranks.rank, run.ranks.world, run.options
    share = list_run_share(plan, rank, world, options, run.sources)
    todo = [(j, share.specs[j]) for j in items_to_encode(share, plan.done)]
    show = shows_progress(options) and rank == 0
    failed = sum(1 for spec in share.specs if spec.error)
    tally = Tally(len(todo) + failed, show, "encode" if world == 1 else f"encode rank 0/{world}")
    writer, forward = _writer_and_forward(run, encoder, plan, share)
    loader = load_items(todo, load_options(options, encoder, run.memory, share.keys), _workers(options))
    try:
        for key, spec in zip(share.keys, share.specs):
            if spec.error:  # found while listing (a missing file, a damaged tar, an unreadable row group)
                writer.add_failure(failed_row(spec.path, key, spec.error, spec.extra))
                tally.add(0, 1, 0)
        for results in encode_groups(loader, forward, options.max_tokens, tally.item_loaded):
            _write(results, writer, tally)
        writer.close()
    except BaseException:
        loader.close()  # stop the workers first
        _keep_what_finished(run, plan, share, forward, writer, tally)
        raise
    finally:
        tally.close()
    return tally, writer.shards_written, share


def _write(results: list[EncodedItem], writer: ShardWriter, tally: Tally) -> None:
    """One forward's results to the shard writer (a shard of their own with ``shard_size_mb`` 0), each item
    counted as it is handed over (the progress bar counts items, not forwards)."""
    for result in results:
        if result.ok:
            writer.add(result.row, result.tensors)
        else:
            writer.add_failure(result.row)
        tally.add(*result.counts())
    writer.end_forward()


def _keep_what_finished(
    run: Run, plan: RunPlan, share: Share, forward: GroupEncoder, writer: ShardWriter, tally: Tally
) -> None:
    """After an error or an interrupt (SIGINT, SIGTERM): write what was encoded, then (one process) index it in
    ``index.jsonl``, so the folder says what it holds whatever stopped the run; ``--resume`` encodes the rest.
    Under torchrun the other ranks may still be writing: each rank's rows stay in its rank file for --resume."""
    try:
        for results in forward.close():
            _write(results, writer, tally)
        writer.close()
    except BaseException:
        writer.abandon()
    if not run.ranks.active:
        try:
            merge_index(Path(plan.out_dir), ordered_paths(plan.units, share.listed), complete=False)
        except Exception:  # a full disk, say: the rank file stays, and the error that stopped the run is raised
            pass


def _workers(options: EncodeOptions) -> int:
    return default_workers() if options.workers is None else options.workers


def _writer_and_forward(run: Run, encoder: Encoder, plan: RunPlan, share: Share) -> tuple[ShardWriter, GroupEncoder]:
    options, fmt = run.options, run.options.output_format
    stored = storage_dtype(fmt, options.storage_dtype, run.dtype)
    shard_bytes = int(options.shard_size_mb * 2**20)
    writer = ShardWriter(Path(plan.out_dir), run.ranks.rank, shard_bytes, True, fmt, stored)
    extras = [spec.extra for spec in share.specs]
    forward = GroupEncoder(
        encoder.model,
        run.device,
        run.dtype,
        encoder.pool,
        options.stores_pooled_only,
        share.keys,
        extras,
        normalize=options.normalizes,
    )
    return writer, forward


def _gather(run: Run, plan: RunPlan, tally: Tally, shards: int, share: Share) -> EncodeResult:
    """Every rank's totals and the items its units held on rank 0, which merges the index in input order once
    every rank's rows are on disk."""
    totals = run.ranks.gather((tally.counts(), shards, share.listed))
    run.ranks.barrier()  # every rank's shards and index rows are on disk
    out_dir = Path(plan.out_dir)
    result = EncodeResult(out_dir=out_dir.resolve(), skipped=len(plan.done), repairs=list(plan.repairs))
    result.output_format = run.options.output_format
    if run.ranks.rank == 0:
        listed: dict[int, list[str]] = {}
        for (_, _, tokens), rank_shards, rank_listed in totals:  # encoded and failed: counted in the index
            result.tokens += tokens
            result.shards += rank_shards
            listed.update(rank_listed)
        paths = ordered_paths(plan.units, listed)
        result.count(merge_index(out_dir, paths), paths, plan.done)  # the counts the index holds
    result.seconds = time.perf_counter() - tally.start
    run.ranks.barrier()  # the merged index exists before any rank returns
    return result
