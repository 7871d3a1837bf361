"""In-memory inputs of the Python API: PIL images, numpy arrays and torch tensors, the encoded bytes of an image
or a video (``bytes``, ``bytearray``, ``memoryview``, ``io.BytesIO``, a file opened ``"rb"``), and Hugging Face
datasets (``datasets.Dataset`` / ``IterableDataset``, the ``data`` extra), given among the paths. Anything else
that is not a path (``str`` / ``os.PathLike``) raises ``TypeError`` naming it; a blank path raises ``ValueError``.

:func:`collect_memory` runs on every rank at the start of ``encode``: each in-memory input becomes a
:class:`MemorySource` among the inputs (expanded to one spec per row, named ``object[I]`` — ``I`` its place
among the inputs — or ``LABEL[ROW]`` for a dataset) and an entry of the run's memory, from which the loader
takes the row (:func:`fetch_memory_row`). Worker processes are forked, so the memory is shared, not copied.

Arrays: numpy ``(H, W)`` or ``(H, W, C)``; tensors ``(C, H, W)`` (torchvision's layout) or ``(H, W)``; ``C``
is 1, 3 or 4; ``uint8`` as is, floats in ``[0, 1]`` (others refused, not clipped), ``uint16`` scaled to 8 bits.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from hevc_vit.encode.options.choices import INSTALL_HINT
from hevc_vit.encode.readers.remote import Network, read_location
from hevc_vit.encode.readers.spec import Fetched, InputSpec, MemoryRow, json_value


@dataclass
class DatasetInput:
    """A dataset with the name its rows get in the index (``NAME[ROW]``): what ``--hf-dataset`` passes."""

    dataset: Any
    name: str


@dataclass
class MemorySource:
    """An in-memory input among the inputs: entry ``number`` of the run's memory, one spec per row."""

    number: int
    paths: list[str]
    extras: list[dict[str, Any]] = field(default_factory=list)

    def specs(self, start: int = 0, stop: int | None = None) -> list[InputSpec]:
        """The specs of rows ``start`` to ``stop`` (default: every row)."""
        stop = len(self.paths) if stop is None else stop
        extras = self.extras or [{} for _ in self.paths]
        return [InputSpec(self.paths[r], ref=MemoryRow(self.number, r), extra=extras[r]) for r in range(start, stop)]


@dataclass
class DatasetColumn:
    """The image column of a dataset (images not decoded: their bytes or path are read by the loader)."""

    dataset: Any
    column: str


def is_memory_object(value: Any) -> bool:
    """A PIL image, an array or a tensor, or the encoded bytes of an image or a video."""
    return isinstance(value, (Image.Image, np.ndarray, torch.Tensor)) or is_encoded_bytes(value)


def is_encoded_bytes(value: Any) -> bool:
    """The content of a file: ``bytes``, ``bytearray``, ``memoryview`` or a binary stream (``io.BytesIO``, a file
    opened with ``"rb"``), decoded as a file of those bytes would be."""
    return isinstance(value, (bytes, bytearray, memoryview, io.BufferedIOBase, io.RawIOBase))


def _encoded_bytes(value: Any) -> bytes:
    if isinstance(value, io.BytesIO):
        return value.getvalue()
    if isinstance(value, (io.BufferedIOBase, io.RawIOBase)):
        return value.read()  # what is left to read, as a copy of the file from here would hold
    return bytes(value)


def check_path_input(i: int, value: Any) -> None:
    """Input ``i`` is not in memory: it must be a path, a URL or a pattern, as a ``str`` or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"inputs[{i}] is {_short(value)} ({type(value).__name__}); expected a path, URL or glob (str or "
            f"pathlib.Path), the bytes of an image or video (bytes, bytearray, memoryview, io.BytesIO), a PIL image, "
            f"a numpy array, a tensor or a datasets.Dataset"
        )
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"inputs[{i}] is the path {path!r} as bytes; give paths as str (bytes are an image's content)")
    if not path.strip() and not os.path.lexists(path):
        what = "an empty string" if not path else f"{path!r}, only whitespace"
        raise ValueError(f"inputs[{i}] is {what}; expected a path, URL or glob")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_dataset(value: Any) -> bool:
    return isinstance(value, DatasetInput) or type(value).__module__.startswith("datasets.")


def collect_memory(inputs: Any, image_column: str, keep_columns: Sequence[str]) -> tuple[list[Any] | None, list[Any]]:
    """``(inputs, memory)``: the inputs as a list, each in-memory one replaced by a :class:`MemorySource`, and
    the run's memory (the objects and datasets, by number). One path or one object is one input."""
    if inputs is None:
        return None, []
    if isinstance(inputs, (str, os.PathLike)) or is_memory_object(inputs) or is_dataset(inputs):
        inputs = [inputs]
    out: list[Any] = []
    memory: list[Any] = []
    for i, value in enumerate(inputs):
        if is_memory_object(value):
            out.append(MemorySource(len(memory), [f"object[{i}]"], [{"id": str(i)}]))
            memory.append([_encoded_bytes(value) if is_encoded_bytes(value) else value])
        elif is_dataset(value):
            out.append(_dataset_source(value, len(memory), image_column, keep_columns, memory))
        elif isinstance(value, MemorySource):
            out.append(value)
        else:
            check_path_input(i, value)
            out.append(value)
    return out, memory


def _dataset_source(value: Any, number: int, image_column: str, keep: Sequence[str], memory: list) -> MemorySource:
    dataset, label = (value.dataset, value.name) if isinstance(value, DatasetInput) else (value, "")
    kind = type(dataset).__name__
    if kind == "DatasetDict" or kind == "IterableDatasetDict":
        raise ValueError(f"a {kind} with splits {list(dataset)}; expected one split, e.g. dataset['train']")
    if kind == "IterableDataset":
        dataset = _materialize(dataset, image_column)
    elif kind != "Dataset":
        raise ValueError(f"a {kind} from the datasets library; expected a Dataset or an IterableDataset")
    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(f"image_column={image_column!r} is not a column of the dataset; it has {columns}")
    missing = [name for name in keep if name not in columns]
    if missing:
        raise ValueError(f"keep_columns {missing} are not columns of the dataset; it has {columns}")
    label = label or "dataset" + (f":{dataset.split}" if dataset.split else "")
    n = len(dataset)
    kept = dataset.select_columns(list(keep))[:] if keep else {}
    extras = [{"id": str(r), **{k: json_value(kept[k][r]) for k in keep}} for r in range(n)]
    images = dataset.select_columns([image_column])
    if type(images.features[image_column]).__name__ == "Image":  # read the bytes; the loader decodes them
        from datasets import Image as ImageFeature  # optional: the 'data' extra

        images = images.cast_column(image_column, ImageFeature(decode=False))
    memory.append(DatasetColumn(images, image_column))
    return MemorySource(number, [f"{label}[{r}]" for r in range(n)], extras)


def _materialize(dataset: Any, image_column: str) -> Any:
    """An ``IterableDataset`` written once to an Arrow cache, so rows can be read by number (images kept as
    their encoded bytes: decoding and saving them again would change a JPEG's pixels)."""
    from datasets import Dataset  # optional: the 'data' extra
    from datasets import Image as ImageFeature  # optional: the 'data' extra

    features = dataset.features
    if features is not None and type(features.get(image_column)).__name__ == "Image":
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))

    def rows(source):
        yield from source

    return Dataset.from_generator(rows, gen_kwargs={"source": dataset}, features=dataset.features)


def open_hf_dataset(name_or_path: str, split: str | None) -> DatasetInput:
    """``--hf-dataset``: a dataset saved with ``save_to_disk`` (a folder), else a Hub name (``load_dataset``)."""
    try:
        import datasets  # optional: the 'data' extra
    except ImportError:
        raise ImportError(f"--hf-dataset needs the datasets library, which is not installed; {INSTALL_HINT}") from None
    if os.path.isdir(name_or_path):
        loaded = datasets.load_from_disk(name_or_path)
    else:
        loaded = datasets.load_dataset(name_or_path, split=split)
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        chosen = split or ("train" if "train" in loaded else None)
        if chosen not in loaded:
            asked = f"--split {split!r}" if split else "no --split given and no 'train' split"
            raise ValueError(f"{asked}: {name_or_path} has the splits {list(loaded)}; choose one with --split")
        loaded, split = loaded[chosen], chosen
    return DatasetInput(loaded, f"{name_or_path}:{split}" if split else name_or_path)


def fetch_memory_row(entry: Any, row: int, network: Network) -> Fetched:
    """The content of row ``row`` of a memory entry (a list of objects, or a dataset's image column)."""
    if isinstance(entry, list):
        if isinstance(entry[row], bytes):  # a file's content: decoded as its first bytes say
            return Fetched("bytes", data=entry[row])
        return Fetched(f"object {row}", image=to_pil(entry[row]))
    value = entry.dataset[row][entry.column]
    if value is None:
        raise ValueError(f"the {entry.column!r} column of row {row} is None")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return Fetched(value.get("path") or "", data=value["bytes"])
        value = value["path"]
    if isinstance(value, str):  # a path or URL
        return Fetched(value, data=read_location(value, network))
    if isinstance(value, bytes):
        return Fetched("", data=value)
    return Fetched(f"row {row}", image=to_pil(value))


def to_pil(value: Any) -> Image.Image:
    """A PIL image from a PIL image, an array or a tensor (see the module's docstring for the layouts)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        array = array.numpy()
        if array.ndim == 3:
            array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    else:
        array = np.asarray(value)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ValueError(
            f"an array of shape {tuple(array.shape)}; expected (H, W) or (H, W, C) with C 1, 3 or 4 "
            f"(a tensor: (C, H, W))"
        )
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)  # mode I;16: the processor scales it to 8 bits
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the array holds NaN or inf; expected pixel values in [0, 1]")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:  # clipping would give a white (0..255 values) or black (normalised) image: refused
            raise ValueError(
                f"a float array holds values in [{low:.6g}, {high:.6g}]; expected [0, 1] (0 = black, 1 = white; "
                f"divide 0..255 values by 255, undo a normalisation)"
            )
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"an array of dtype {array.dtype}; expected uint8, uint16 (H, W), bool or floats in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(array))
