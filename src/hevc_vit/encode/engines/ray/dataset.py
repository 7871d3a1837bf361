"""``encode_dataset``: a ``ray.data.Dataset`` of images in, a dataset of features out; and the stage settings
that it and :func:`.folder.encode_folder` share (:class:`Stages`).

Legend: ``N`` patches of one item, ``D`` width.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

from hevc_vit.encode.decode.item import LoadOptions
from hevc_vit.encode.engines.pipeline import load_options
from hevc_vit.encode.engines.ray import cluster
from hevc_vit.encode.engines.ray.cluster import cluster_has_gpus, connect, import_ray
from hevc_vit.encode.engines.ray.stages import (
    FAULT_ENV,
    ITEM,
    Batch,
    ModelStage,
    load_isolated,
    passed_through,
    pickled,
)
from hevc_vit.encode.model.loader import Encoder, largest_item, prepare_encoder
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.readers.memory import DatasetColumn
from hevc_vit.encode.readers.spec import InputSpec, MemoryRow
from hevc_vit.runtime.devices import describe_dtype_choice, resolve_dtype

DECODE_ROWS = 8  # inputs per decode call: few, so the CPU stage spreads over many workers
PATH_COLUMNS = ("path", "id")  # the column naming a row, when path_column is not given: the first present


def encode_dataset(ds: Any, options: EncodeOptions | None = None, *, batch_size: int | None = None, **overrides: Any):
    """Features for the rows of the ``ray.data.Dataset`` ``ds``, as a dataset (lazy, like any Ray Data stage).

    Input rows: ``options.image_column`` (default ``image``) holds encoded bytes (an image or a clip), a
    ``{"bytes", "path"}`` dict, a path or URL, a PIL image or an ``(H, W, C)`` array (``ray.data.read_images``);
    ``options.path_column`` (default: ``path``, else ``id``) names the row. Output rows: the input's other columns,
    then ``status`` (``ok``/``failed``), ``error``, ``grid_thw`` ``(3,)`` int64 (zeros when failed), ``pooled``
    ``(D,)`` (with pooling; NaN when failed), ``patches`` ``(N, D)`` (unless ``pooled_only``; ``(0, D)`` when
    failed) and ``index_row`` (the JSON row ``encode``'s index would hold). Features are float32 (float16 with
    ``storage_dtype="float16"``). A bad input is a failed row with its reason, never a failed job.

    options/overrides: as for ``encode`` (``model``, ``processor``, ``max_tokens``, ``decode_cpus``,
    ``model_actors``, ``ray_address``, ...); the model is loaded here once and sent to the actors. batch_size:
    items per model call (see :func:`.folder.encode_folder`). Model actors that do not all start within
    :data:`.cluster.ACTORS_START_S` (the dataset's ``context.wait_for_min_actors_s``, unless set before) fail the
    execution with Ray's ``GetTimeoutError``.
    """
    options = (options or EncodeOptions()).replace(engine="ray", **overrides)
    import_ray()
    connect(options.ray_address, options.ray_timeout)
    encoder, device, dtype = prepare(options, lambda message: None)
    stages = Stages(options, encoder, device, dtype, [], batch_size)
    decoded = stages.decode(ds, load_rows, {"load": stages.load, "options": options})
    out = stages.model(decoded, columns=True)
    if out.context.wait_for_min_actors_s <= 0:  # Ray Data's default: no bound (a user's own bound stands)
        out.context.wait_for_min_actors_s = cluster.ACTORS_START_S  # then Ray's GetTimeoutError
    return out


def prepare(options: EncodeOptions, say: Callable[[str], None]) -> tuple[Encoder, torch.device, torch.dtype]:
    """The model loaded on the driver (on the CPU, in the dtype of the device the actors will use: a GPU when
    the cluster has one), with its processor and pooling checked."""
    device = torch.device(options.device or ("cuda" if cluster_has_gpus() else "cpu"))
    dtype = resolve_dtype(options.dtype, device)
    if options.dtype in (None, "auto"):
        say(describe_dtype_choice(device))  # the driver's choice, which every actor then uses
    return prepare_encoder(options, torch.device("cpu"), dtype, say), device, dtype


MAX_PART_ROWS = 4096  # items per written part at most (pooled vectors are small: a part per ~4k items)


class Stages:
    """The decode and model stages of a run, configured from its options (and the run's in-memory inputs)."""

    def __init__(self, options, encoder: Encoder, device: torch.device, dtype: torch.dtype, memory, batch_size):
        config = encoder.model.config
        self.options, self.device, self.dtype = options, device, dtype
        self.load = load_options(options, encoder, memory, [])
        if self.load.preview_dir is not None:  # written by the decoding workers, whose folder may differ
            self.load = dataclasses.replace(self.load, preview_dir=os.path.abspath(self.load.preview_dir))
        # the actors get the loaded model and the resolved processor: no node needs the checkpoint's files
        # and the dtype the driver resolved: an actor on a node of another CPU kind must not pick its own
        dtype_name = str(dtype).removeprefix("torch.")
        self.actor_options = options.replace(model=encoder.model, processor=encoder.processor, dtype=dtype_name)
        largest = largest_item(encoder.processor, options.video_frames, config.patch_size)
        self.batch_size = batch_size or max(1, 4 * options.max_tokens // max(1, largest))
        self.part_rows = self._part_rows(config.hidden_size, largest)

    def _part_rows(self, width: int, largest: int) -> int:
        """Items per written part: as many as fill ``shard_size_mb`` when every item is the largest the processor
        makes (at least one model call's worth, at most ``MAX_PART_ROWS``), so a large run is not a part per model
        call; ``shard_size_mb`` 0: a part per model call."""
        options = self.options
        pooled_only = options.stores_pooled_only
        item_bytes = width * 4 * (1 if pooled_only else largest + 1)  # float32: an upper bound for every storage
        rows = int(options.shard_size_mb * 2**20) // item_bytes
        return self.batch_size if rows <= self.batch_size else min(rows, MAX_PART_ROWS)

    def decode(self, ds, fn: Callable[..., Batch], fn_kwargs: dict[str, Any]):
        """CPU tasks, ``decode_cpus`` at once (default: as many as the cluster has room for)."""
        import ray.data  # optional: the 'ray' extra

        size = self.options.decode_cpus
        compute = ray.data.TaskPoolStrategy(size=size) if size else None
        return ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=DECODE_ROWS, num_cpus=1, compute=compute)

    def model(self, ds, columns: bool = False, progress: Any = None):
        """``model_actors`` actors (default: one per GPU of the cluster, else one); Ray restarts a lost actor and
        retries its call. progress: a :class:`.stages.DoneKeys` actor told the keys of each finished call."""
        import ray  # optional: the 'ray' extra

        gpu = self.device.type == "cuda"
        actors = self.options.model_actors or (int(ray.cluster_resources().get("GPU", 1)) if gpu else 1)
        kwargs = dict(options=self.actor_options, device=self.device.type, columns=columns, progress=progress)
        # blocks of one model call each; the regrouping also keeps Ray from fusing the decode tasks into the actors
        # (which it does when their resources match, e.g. on CPUs), so decoding scales apart from the model
        ds = ds.repartition(target_num_rows_per_block=self.batch_size)
        return ds.map_batches(
            ModelStage,
            fn_constructor_kwargs={**kwargs, "fault": os.environ.get(FAULT_ENV)},
            batch_size=self.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=1 if gpu else 0,
        )


def load_rows(batch: Batch, load: LoadOptions, options: EncodeOptions) -> Batch:
    """Decode stage of :func:`encode_dataset`: the image column -> ``item``, read as a row of a dataset is."""
    column = options.image_column
    if column not in batch:
        raise ValueError(f"image_column={column!r} is not a column of the dataset; it has {sorted(batch)}")
    names = _row_names(batch, options.path_column)
    rows = [{column: value} for value in batch[column]]
    load = dataclasses.replace(load, memory=[DatasetColumn(rows, column)], keys=[f"{j:08d}" for j in range(len(rows))])
    items = load_isolated([(j, InputSpec(name, ref=MemoryRow(0, j))) for j, name in enumerate(names)], load)
    return {**passed_through(batch, column), ITEM: pickled(items)}


def _row_names(batch: Batch, path_column: str | None) -> list[str]:
    found = [path_column] if path_column else [name for name in PATH_COLUMNS if name in batch][:1]
    if not found or found[0] not in batch:
        raise ValueError(
            f"path_column={path_column!r}: the dataset has the columns {sorted(batch)}; expected a column naming "
            f"each row ({' or '.join(PATH_COLUMNS)}, or path_column=NAME)"
        )
    return [value.decode() if isinstance(value, bytes) else str(value) for value in batch[found[0]]]
