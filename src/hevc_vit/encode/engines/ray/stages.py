"""The stages of the Ray engine, each a function or class Ray Data maps over batches of rows.

* decode (CPU tasks): :func:`load_specs` — a row per input (``key``, ``spec``: a pickled ``InputSpec``) becomes a
  row with the ``item`` column, the pickled :class:`~hevc_vit.encode.decode.load.LoadedItem` (patches, grid, or the
  reason it failed), through ``encode.loading.load_item``;
* model (actors): :class:`ModelStage` — the items of a batch packed to the token budget and encoded by
  ``encode.model.forward.GroupEncoder`` (through ``engines.pipeline.encode_groups``, as the local engine does);
  out comes one result per item, pickled (``result``: an ``EncodedItem``: the index row, the tensors, the patch
  count) or as feature columns (:func:`feature_columns`, for :func:`.dataset.encode_dataset`);
* write (CPU tasks): :func:`write_block` — the results of a block become one part in the output folder through
  ``encode.shards.ShardWriter``, with its rows in an index file of its own, ``index.rankNNNNN.jsonl``, where
  ``NNNNN`` is the number of the block's first input in the run's listing (``ordinal``), so the parts read
  ``shards/rank00000-00000.safetensors``, ``shards/rank00512-00000.safetensors``, ... (blocks share no input, so
  no two have the same first one). A retried block finds its rows there and writes nothing again; the driver
  merges every such file into ``index.jsonl`` at the end, as it merges the ranks' files.

The model stage also tells :class:`DoneKeys` (an actor) the keys it finished: the driver's progress bar.
Columns that are not the stage's own pass through unchanged, in row order.

Test seam: the driver reads ``HEVC_VIT_RAY_FAULT`` (a file's path) and hands it to the stages; while that file
exists, the first model call or write whose stage it names (``model`` or ``write``) deletes it and ends its
process (a lost actor or worker), which Ray must retry. ``hold model`` / ``hold write``: that call writes
``held`` to the file and waits while the file exists (at most :data:`HOLD_SECONDS`), the run paused mid-way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.decode.workers import load_items
from hevc_vit.encode.engines.pipeline import encode_groups
from hevc_vit.encode.model.forward import EncodedItem, GroupEncoder
from hevc_vit.encode.model.loader import prepare_encoder
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.index import rank_index_name, read_jsonl, row_json
from hevc_vit.encode.output.shards import ShardWriter
from hevc_vit.encode.readers.spec import InputSpec
from hevc_vit.runtime.devices import resolve_dtype

ITEM, RESULT, ORDINAL = "item", "result", "ordinal"
FAULT_ENV = "HEVC_VIT_RAY_FAULT"
HOLD_SECONDS = 300
Batch = dict[str, np.ndarray]


def pickled(values: list[Any]) -> np.ndarray:
    """A column of pickled objects (Arrow stores it as binary)."""
    column = np.empty(len(values), dtype=object)
    column[:] = [pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL) for v in values]
    return column


def passed_through(batch: Batch, *used: str) -> Batch:
    return {name: values for name, values in batch.items() if name not in used}


def _fault_says(fault: str | None) -> str:
    try:
        return Path(fault).read_text().strip() if fault else ""
    except OSError:  # another process took it
        return ""


def hold(fault: str | None, stage: str) -> None:
    """The test seam (see the module's docstring): wait while ``fault`` exists, when it says ``hold`` ``stage``
    (after writing ``held`` to it: the test's sign that the run is paused here)."""
    if _fault_says(fault) != f"hold {stage}":
        return
    temporary = f"{fault}.{os.getpid()}"
    Path(temporary).write_text("held")
    os.replace(temporary, fault)
    end = time.monotonic() + HOLD_SECONDS
    while os.path.exists(fault) and time.monotonic() < end:
        time.sleep(0.1)


def fail_once(fault: str | None, stage: str) -> None:
    """The test seam (see the module's docstring): end this process once, when ``fault`` names ``stage``."""
    if _fault_says(fault) != stage:
        return
    try:
        os.unlink(fault)
    except FileNotFoundError:  # another process took it
        return
    os._exit(1)


# --------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------


def load_isolated(work: list[tuple[int, InputSpec]], load: LoadOptions) -> list[LoadedItem]:
    """``load_item`` for each ``(index, spec)``, in a worker process of the local engine's loader
    (``encode.workers.load_items``): a decoder that crashes its process fails only its input, where a Ray task
    that died would be retried, and fail again, without end."""
    return list(load_items(work, load, 1))


def load_specs(batch: Batch, load: LoadOptions, cwd: str) -> Batch:
    """Decode stage of :func:`.folder.encode_folder`: ``spec`` (a pickled ``InputSpec``) -> ``item`` (item ``j``
    of the batch has index ``j``; ``key``: the shard keys). An input found unreadable while the inputs were
    listed keeps that reason. A relative path is read from ``cwd`` (the driver's; a worker's may differ) and keeps
    its name."""
    load = dataclasses.replace(load, keys=[str(key) for key in batch["key"]])
    specs: list[InputSpec] = [pickle.loads(blob) for blob in batch["spec"]]
    work = [(j, _located(spec, cwd)) for j, spec in enumerate(specs) if not spec.error]
    loaded = iter(load_isolated(work, load))
    items = []
    for j, spec in enumerate(specs):
        item = LoadedItem(j, spec.path, error=spec.error) if spec.error else next(loaded)
        item.path = spec.path
        items.append(item)
    return {**passed_through(batch, "spec"), ITEM: pickled(items)}


def _located(spec: InputSpec, cwd: str) -> InputSpec:
    if spec.ref is not None or os.path.isabs(spec.path):
        return spec
    return dataclasses.replace(spec, path=os.path.join(cwd, spec.path))


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


class DoneKeys:
    """The keys of the inputs the model stage has finished (a Ray actor, zero CPUs): the run's progress. A key is
    counted once, however often Ray retried its call."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def add(self, keys: list[str]) -> None:
        self.keys.update(keys)

    def count(self) -> int:
        return len(self.keys)


class ModelStage:
    """A model replica (a Ray actor): the model loaded once, then each batch of decoded items packed into
    forwards of at most ``max_tokens`` patches (first-fit decreasing) and encoded, as the local engine does.

    options: the run's options, with ``model`` the model object or a path every node can read; device: ``cuda``
    (the GPU Ray assigned to the actor) or ``cpu``. With ``columns`` the results become feature columns
    (:func:`feature_columns`), else one pickled :class:`~hevc_vit.encode.model.forward.EncodedItem` per item.
    """

    def __init__(
        self, options: EncodeOptions, device: str, columns: bool = False, fault: str | None = None, progress=None
    ):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.encoder = prepare_encoder(options, self.device, self.dtype, lambda message: None)
        self.options, self.columns, self.fault, self.progress = options, columns, fault, progress
        self.pooled_only = options.stores_pooled_only

    def __call__(self, batch: Batch) -> Batch:
        hold(self.fault, "model")
        fail_once(self.fault, "model")
        items: list[LoadedItem] = [pickle.loads(blob) for blob in batch[ITEM]]
        keys = [str(key) for key in batch["key"]] if "key" in batch else [f"{j:08d}" for j in range(len(items))]
        extras = [json.loads(extra) for extra in batch["extra"]] if "extra" in batch else None
        results = self.encode(items, keys, extras)
        if self.progress is not None:
            self.progress.add.remote(keys)  # not waited for: the bar may lag, never the run
        if self.columns:
            width, pool = self.encoder.model.config.hidden_size, self.encoder.pool
            columns = feature_columns(results, width, self.options, pool, self.pooled_only)
            return {**passed_through(batch, ITEM), **columns}
        return {**passed_through(batch, ITEM), RESULT: pickled(results)}

    def encode(
        self, items: list[LoadedItem], keys: list[str], extras: list[dict[str, Any]] | None
    ) -> list[EncodedItem]:
        """The result of each item, in order (item ``j``: shard key ``keys[j]``, source fields ``extras[j]``)."""
        for j, item in enumerate(items):
            item.index = j  # the forward finds its key and extras by index
        encoder = self.encoder
        forward = GroupEncoder(
            encoder.model,
            self.device,
            self.dtype,
            encoder.pool,
            self.pooled_only,
            keys,
            extras,
            normalize=self.options.normalizes,
        )
        by_key = {}  # a failed item's result comes at once, before those of the forward pending then
        for results in encode_groups(iter(items), forward, self.options.max_tokens):
            by_key.update((result.row["key"], result) for result in results)
        return [by_key[key] for key in keys]


def feature_columns(
    results: list[EncodedItem], width: int, options: EncodeOptions, pool: str, pooled_only: bool
) -> Batch:
    """The results of a model call as columns (see :func:`.dataset.encode_dataset`)."""
    dtype = torch.float16 if options.storage_dtype == "float16" else torch.float32
    columns: dict[str, list] = {"status": [], "error": [], "grid_thw": [], "index_row": []}
    if pool != "none":
        columns["pooled"] = []
    if not pooled_only:
        columns["patches"] = []
    for result in results:
        row, tensors = result.row, result.tensors
        columns["status"].append(row["status"])
        columns["error"].append(row["error"])
        columns["index_row"].append(row_json(row))  # strict JSON: no NaN
        columns["grid_thw"].append(tensors["grid_thw"].numpy() if tensors else np.zeros(3, np.int64))
        if "pooled" in columns:
            empty = torch.full((width,), float("nan"))
            columns["pooled"].append(tensors.get("pooled", empty).to(dtype).numpy())
        if "patches" in columns:
            columns["patches"].append(tensors.get("patches", torch.zeros(0, width)).to(dtype).numpy())
    out = {name: np.array(values) for name, values in columns.items() if name != "patches"}
    if "patches" in columns:  # one (N, D) array per row, N varying
        out["patches"] = np.empty(len(results), dtype=object)
        out["patches"][:] = columns["patches"]
    return out


# --------------------------------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------------------------------


def block_number(ordinals: np.ndarray) -> int:
    """The number a block's part and index file are named by: its first input's number in the run's listing
    (a retried block has the same; blocks share no input, so no other block has it)."""
    return int(np.min(ordinals))


def block_written(out_dir: Path, number: int, rows: list[dict[str, Any]]) -> bool:
    """An earlier attempt at this block wrote the rows of all its inputs (a row is appended only after the part
    that holds its features is published)."""
    path = out_dir / rank_index_name(number)
    if not path.is_file():
        return False
    written = {row["path"] for row in read_jsonl(path)}
    return all(row["path"] in written for row in rows)


def write_block(batch: Batch, out_dir: str, output_format: str, storage: Any, fault: str | None = None) -> Batch:
    """Write stage: one part (and the block's index file) for the block's results; returns the block's counts
    (``encoded``, ``failed``, ``tokens``, ``parts``), one row."""
    hold(fault, "write")
    results: list[EncodedItem] = [pickle.loads(blob) for blob in batch[RESULT]]
    rows = [result.row for result in results]
    folder, parts = Path(out_dir), 0
    number = block_number(batch[ORDINAL]) if rows else 0
    if rows and not block_written(folder, number, rows):
        writer = ShardWriter(folder, number, 0, False, output_format, storage)
        try:
            for result in results:
                if result.ok:
                    writer.add(result.row, result.tensors)
                else:
                    writer.add_failure(result.row)
            writer.close()
        except BaseException:
            writer.abandon()
            raise
        parts = writer.shards_written
    fail_once(fault, "write")
    encoded = sum(1 for result in results if result.ok)
    tokens = sum(result.tokens for result in results)
    return {
        name: np.array([value])
        for name, value in (
            ("encoded", encoded),
            ("failed", len(results) - encoded),
            ("tokens", tokens),
            ("parts", parts),
        )
    }
