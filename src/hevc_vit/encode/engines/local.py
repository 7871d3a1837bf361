"""One ``hevc-vit encode`` run, per rank: claim the output folder, load the model, agree on the plan, encode
this rank's share, then gather the totals and merge the index.

Under ``torchrun`` (or with ``torch.distributed`` initialised) rank 0 expands the inputs to work units (a file,
a tar shard, a parquet row group, ...: :mod:`.units`) and unit ``u`` goes to rank ``u % world_size``, which lists
it into items; every rank writes its own shards and index rows, and rank 0 merges the index after a barrier.
Rank 0 alone holds the folder's lock and decides the plan; an error it meets reaches every rank with the plan,
so no rank waits forever.
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
from tqdm import tqdm

from hevc_vit.codec.config import CodecSparseConfig
from hevc_vit.encode.decode.load import LoadedItem, LoadOptions
from hevc_vit.encode.decode.workers import default_workers, load_items
from hevc_vit.encode.engines.distributed import Ranks
from hevc_vit.encode.model.batching import TokenBudgetPacker
from hevc_vit.encode.model.forward import GroupEncoder
from hevc_vit.encode.model.loader import Encoder, prepare_encoder, run_settings
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.folder import RunPlan, claim_out_dir, prepare_folder, reporting_full_disk
from hevc_vit.encode.output.formats import storage_dtype
from hevc_vit.encode.output.index import failed_row, merge_index
from hevc_vit.encode.output.result import EncodeResult
from hevc_vit.encode.output.shards import ShardWriter
from hevc_vit.encode.readers.expand import SourceOptions
from hevc_vit.encode.readers.memory import MemorySource, collect_memory
from hevc_vit.encode.readers.remote import Network, check_url_packages
from hevc_vit.encode.readers.units import Share, items_to_encode, list_share, ordered_paths
from hevc_vit.runtime.devices import describe_dtype_choice, resolve_device, resolve_dtype


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
    check_url_packages(_as_locations(inputs))  # a missing package stops the run before anything is made
    if options.engine == "ray":  # the same run as a Ray Data pipeline (the ray extra)
        from hevc_vit.encode.engines.ray import encode_folder

        return encode_folder(inputs, out_dir, options)
    # one path or object is one input; objects and datasets stay in this process's memory, read by row
    inputs, memory = collect_memory(inputs, options.image_column, SourceOptions.of(options).keep_columns)
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = Run(options, device, resolve_dtype(options.dtype, device), Ranks.setup(device), memory)
    run.sources = {m.number: m for m in inputs or [] if isinstance(m, MemorySource)}
    try:
        return _encode_claimed(run, inputs, out_dir)
    finally:
        run.ranks.close()


def _as_locations(inputs: Any) -> list[Any]:
    """The inputs given as paths or URLs (strings), of one input or a sequence."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    if isinstance(inputs, (list, tuple)):
        return [os.fspath(i) for i in inputs if isinstance(i, (str, os.PathLike))]
    return []


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


class Tally:
    """This rank's counts (inputs encoded and failed, patches encoded) and its progress bar."""

    def __init__(self, total: int, show: bool, desc: str):
        self.encoded = self.failed = self.tokens = self.loaded = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="item", disable=not show, file=sys.stderr, dynamic_ncols=True)

    def add(self, encoded: int, failed: int, tokens: int) -> None:
        self.encoded += encoded
        self.failed += failed
        self.tokens += tokens
        self.bar.update(encoded + failed)
        self._postfix()

    def item_loaded(self) -> None:
        """An item was decoded and prepared; it counts as done once its features are written (or it failed)."""
        self.loaded += 1
        self._postfix(refresh=True)

    def _postfix(self, refresh: bool = False) -> None:
        secs = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.loaded} loaded, {self.tokens / secs:,.0f} tokens/s", refresh=refresh)

    def counts(self) -> tuple[int, int, int]:
        return self.encoded, self.failed, self.tokens

    def close(self) -> None:
        self.bar.close()


def _encode_share(run: Run, encoder: Encoder, plan: RunPlan) -> tuple[Tally, int, Share]:
    """This rank's units listed into items, which are loaded (in worker processes), grouped to the token budget,
    encoded and written; returns the tally, the number of shards written and the listing. After an error what
    finished is kept."""
    rank, world, options = run.ranks.rank, run.ranks.world, run.options
    sources = SourceOptions.of(options)
    share = list_share(
        plan.units, rank, world, sources.path_column, sources.keep_columns, sources.network, run.sources, plan.keys
    )
    todo = [(j, share.specs[j]) for j in items_to_encode(share, plan.done)]
    show = (sys.stderr.isatty() if options.progress is None else options.progress) and rank == 0
    failed = sum(1 for spec in share.specs if spec.error)
    tally = Tally(len(todo) + failed, show, "encode" if world == 1 else f"encode rank 0/{world}")
    writer, forward = _writer_and_forward(run, encoder, plan, share, tally)
    loader = load_items(todo, load_options(options, encoder, run.memory, share.keys), _workers(options))
    try:
        for key, spec in zip(share.keys, share.specs):
            if spec.error:  # found while listing (a missing file, a damaged tar, an unreadable row group)
                writer.add_failure(failed_row(spec.path, key, spec.error, spec.extra))
                tally.add(0, 1, 0)
        feed_groups(loader, forward, writer, tally, options.max_tokens)
        forward.close()
        writer.close()
    except BaseException:
        loader.close()  # stop the workers first
        _keep_what_finished(run, plan, share, forward, writer)
        raise
    finally:
        tally.close()
    return tally, writer.shards_written, share


def _keep_what_finished(run: Run, plan: RunPlan, share: Share, forward: GroupEncoder, writer: ShardWriter) -> None:
    """After an error or an interrupt (SIGINT, SIGTERM): write what was encoded, then (one process) index it in
    ``index.jsonl``, so the folder says what it holds whatever stopped the run; ``--resume`` encodes the rest.
    Under torchrun the other ranks may still be writing: each rank's rows stay in its rank file for --resume."""
    try:
        forward.close()
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


def _writer_and_forward(
    run: Run, encoder: Encoder, plan: RunPlan, share: Share, tally: Tally
) -> tuple[ShardWriter, GroupEncoder]:
    options, fmt = run.options, run.options.output_format
    stored = storage_dtype(fmt, options.storage_dtype, run.dtype)
    shard_bytes = int(options.shard_size_mb * 2**20)
    writer = ShardWriter(Path(plan.out_dir), run.ranks.rank, shard_bytes, True, fmt, stored)
    pooled_only = options.stores_pooled_only
    extras = [spec.extra for spec in share.specs]
    forward = GroupEncoder(
        encoder.model,
        run.device,
        run.dtype,
        encoder.pool,
        pooled_only,
        writer,
        tally.add,
        share.keys,
        extras,
        normalize=options.normalizes,
    )
    return writer, forward


def load_options(options: EncodeOptions, encoder: Encoder, memory: list, keys: list[str]) -> LoadOptions:
    """How the loaders (local worker processes, or Ray's decode stage) read and prepare the inputs of a run:
    ``memory`` holds its in-memory inputs, ``keys`` the shard keys of the items in the order they are loaded."""
    config = encoder.model.config
    codec = (
        CodecSparseConfig(frames=options.video_frames, budget=options.codec_budget) if options.codec_sparse else None
    )
    return LoadOptions(
        encoder.processor,
        config.patch_size,
        config.num_channels,
        options.video_frames,
        options.temporal_context,
        codec=codec,
        preview_dir=options.codec_preview_dir,
        memory=memory,
        network=Network(options.retries, options.timeout),
        jpeg_draft=options.jpeg_draft,
        exif_transpose=options.exif_transpose,
        keys=keys,
        video_backend=options.video_backend,
    )


def feed_groups(loader: Iterator[LoadedItem], forward: GroupEncoder, writer: ShardWriter, tally: Tally, budget: int):
    """Loaded items (in order) into forwards of at most ``budget`` patches; a failed item is a failed row."""
    packer: TokenBudgetPacker[LoadedItem] = TokenBudgetPacker(budget)
    loaded = getattr(tally, "item_loaded", None)  # the progress bar's count of prepared items (local engine)
    for item in loader:  # in input order; a worker that dies fails only its input
        if loaded is not None:
            loaded()
        if item.error:
            writer.add_failure(forward.failure_row(item))
            tally.add(0, 1, 0)
            continue
        for group in packer.add(item, item.num_tokens):
            forward.run(group)
    for group in packer.flush():
        forward.run(group)


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
