"""One ``hevc-vit encode`` run, per rank: claim the output folder, load the model, agree on the plan, encode
this rank's share, then gather the totals and merge the index.

Under ``torchrun`` (or with ``torch.distributed`` initialised) input ``i`` goes to rank ``i % world_size``;
every rank writes its own shards and index rows, and rank 0 merges the index after a barrier. Rank 0 alone
holds the folder's lock and decides the plan; an error it meets reaches every rank with the plan, so no rank
waits forever.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..codec.config import CodecSparseConfig
from ..devices import resolve_device, resolve_dtype
from .batching import TokenBudgetPacker
from .distributed import Ranks
from .folder import RunPlan, claim_out_dir, prepare_folder, reporting_full_disk
from .formats import storage_dtype
from .forward import GroupEncoder, failure_row
from .index import merge_index
from .loading import LoadedItem, LoadOptions, default_workers, load_items
from .model import Encoder, prepare_encoder, run_settings
from .objects import collect_memory
from .options import EncodeOptions
from .result import EncodeResult
from .shards import ShardWriter
from .sources import SourceOptions


def encode(
    inputs: Any = None,
    out_dir: str | os.PathLike | None = None,
    options: EncodeOptions | None = None,
    **overrides: Any,
) -> EncodeResult:
    """Encode images and videos to features in ``out_dir``: safetensors shards plus ``index.jsonl``.

    inputs: files, folders (recursive), globs, brace ranges, ``.txt`` list files, webdataset ``.tar`` shards,
        ``.parquet``/``.csv``/``.tsv``/``.jsonl`` tables of paths, URLs (fsspec), PIL images, numpy arrays,
        tensors and ``datasets.Dataset``/``IterableDataset`` (images from ``image_column``), in any mix; one path
        or one object is one input; None or empty: the sample images and clip shipped with the package.
    out_dir: the output folder; None: ``./hevc_vit_features`` (or ``-2``, ``-3``, ... when taken). An
        existing non-empty folder is refused unless ``resume`` or ``overwrite``.
    options: an :class:`EncodeOptions` (default: all defaults); overrides: its fields by name, on top
        (``encode(inputs, out, model="ckpt", frames=4)``). Invalid values are refused before anything is
        loaded or created.

    Returns an :class:`EncodeResult`; per-input failures are recorded in the index, not raised. The output
    folder is held exclusively (a lock that ends with the process) from before the first check until the run
    returns. A full disk raises an ``OSError`` naming the folder and its free space; what finished is kept.
    """
    options = _options(options, overrides)
    # one path or object is one input; objects and datasets stay in this process's memory, read by row
    inputs, memory = collect_memory(inputs, options.image_column, SourceOptions.of(options).keep_columns)
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = Run(options, device, resolve_dtype(options.dtype, device), Ranks.setup(device), memory)
    try:
        return _encode_claimed(run, inputs, out_dir)
    finally:
        run.ranks.close()


def _options(options: EncodeOptions | None, overrides: dict[str, Any]) -> EncodeOptions:
    if options is None:
        options = EncodeOptions()
    elif not isinstance(options, EncodeOptions):
        raise TypeError(f"options is a {type(options).__name__}; expected an EncodeOptions (or None)")
    return options.replace(**overrides) if overrides else options


@dataclass
class Run:
    """What every step of a run needs: the options, the device and dtype resolved, this process's rank."""

    options: EncodeOptions
    device: torch.device
    dtype: torch.dtype
    ranks: Ranks
    memory: list = field(default_factory=list)  # in-memory inputs (objects, datasets), by number: every rank's own

    def say(self, message: str) -> None:
        """A notice for people: rank 0 only, to ``options.log`` (default: stderr)."""
        if self.ranks.rank != 0:
            return
        if self.options.log is not None:
            self.options.log(message)
        else:
            print(message, file=sys.stderr, flush=True)


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
    encoder = prepare_encoder(run.options, run.device, run.dtype, run.say)
    settings = run_settings(run.options, encoder, run.dtype, run.ranks.world, with_weights=run.ranks.rank == 0)
    plan = _agree_on_plan(run, inputs, folder, settings, refusal)
    with reporting_full_disk(Path(plan.out_dir)):
        tally, shards = _encode_share(run, encoder, plan)
        return _gather(run, plan, tally, shards)


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
        except (ValueError, OSError) as e:
            if not run.ranks.active:
                raise
            plan = RunPlan.refused(e)
    plan = run.ranks.broadcast(plan)
    plan.raise_error()
    return plan


class Tally:
    """This rank's counts (inputs encoded and failed, patches encoded) and its progress bar."""

    def __init__(self, total: int, show: bool, desc: str):
        from tqdm import tqdm

        self.encoded = self.failed = self.tokens = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="item", disable=not show, file=sys.stderr, dynamic_ncols=True)

    def add(self, encoded: int, failed: int, tokens: int) -> None:
        self.encoded += encoded
        self.failed += failed
        self.tokens += tokens
        self.bar.update(encoded + failed)
        secs = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / secs:,.0f} tokens/s", refresh=False)

    def counts(self) -> tuple[int, int, int]:
        return self.encoded, self.failed, self.tokens

    def close(self) -> None:
        self.bar.close()


def _encode_share(run: Run, encoder: Encoder, plan: RunPlan) -> tuple[Tally, int]:
    """This rank's inputs loaded (in worker processes), grouped to the token budget, encoded and written;
    returns the tally and the number of shards written. After an error what finished is kept."""
    rank, world, options = run.ranks.rank, run.ranks.world, run.options
    share = [
        (i, spec)  # the spec: a path, or where the content is (tar member, URL, row in memory)
        for i, spec in enumerate(plan.specs)
        if i % world == rank and not spec.error and spec.path not in plan.done
    ]
    show = (sys.stderr.isatty() if options.progress is None else options.progress) and rank == 0
    tally = Tally(len(share), show, "encode" if world == 1 else f"encode rank 0/{world}")
    fmt = options.output_format
    stored = storage_dtype(fmt, options.storage_dtype, run.dtype)
    writer = ShardWriter(Path(plan.out_dir), rank, int(options.shard_size_mb * 2**20), True, fmt, stored)
    pooled_only = options.pooled_only or fmt == "npy-parquet"  # it stores the pooled embeddings alone
    forward = GroupEncoder(encoder.model, run.device, run.dtype, encoder.pool, pooled_only, writer, tally.add)
    config = encoder.model.config
    codec = (
        CodecSparseConfig(frames=options.video_frames, budget=options.codec_budget) if options.codec_sparse else None
    )
    load = LoadOptions(
        encoder.processor,
        config.patch_size,
        config.num_channels,
        options.video_frames,
        options.temporal_context,
        codec=codec,
        preview_dir=options.codec_preview_dir,
        memory=run.memory,
        retries=options.retries,
    )
    loader = load_items(share, load, default_workers() if options.workers is None else options.workers)
    try:
        _feed(loader, forward, writer, tally, options.max_tokens)
        forward.close()
        writer.close()
    except BaseException:
        loader.close()  # stop the workers first
        try:  # keep what finished: its inputs are skipped by --resume
            forward.close()
            writer.close()
        except BaseException:
            writer.abandon()
        raise
    finally:
        tally.close()
    return tally, writer.shards_written


def _feed(loader: Iterator[LoadedItem], forward: GroupEncoder, writer: ShardWriter, tally: Tally, budget: int):
    packer: TokenBudgetPacker[LoadedItem] = TokenBudgetPacker(budget)
    for item in loader:  # in input order; a worker that dies fails only its input
        if item.error:
            writer.add_failure(failure_row(item))
            tally.add(0, 1, 0)
            continue
        for group in packer.add(item, item.num_tokens):
            forward.run(group)
    for group in packer.flush():
        forward.run(group)


def _gather(run: Run, plan: RunPlan, tally: Tally, shards: int) -> EncodeResult:
    """Every rank's totals on rank 0, which merges the index once every rank's rows are on disk."""
    totals = run.ranks.gather((tally.counts(), shards))
    run.ranks.barrier()  # every rank's shards and index rows are on disk
    out_dir = Path(plan.out_dir)
    result = EncodeResult(out_dir=out_dir.resolve(), skipped=len(plan.done), repairs=list(plan.repairs))
    result.output_format = run.options.output_format
    if run.ranks.rank == 0:
        for (encoded, failed, tokens), rank_shards in totals:
            result.encoded += encoded
            result.failed += failed
            result.tokens += tokens
            result.shards += rank_shards
        specs = plan.specs
        paths, errors, extras = [s.path for s in specs], [s.error for s in specs], [s.extra for s in specs]
        result.rows = merge_index(out_dir, paths, errors, extras)
        result.failed += sum(1 for spec in specs if spec.error)
    result.seconds = time.perf_counter() - tally.start
    run.ranks.barrier()  # the merged index exists before any rank returns
    return result
