"""``encode()``: the options checked, then the run handed to an engine: the local one (this process, or one rank
of ``torchrun``: :mod:`.engines.local`) or Ray (:mod:`.engines.ray`). This is the one module that knows both."""

from __future__ import annotations

import os
from typing import Any

from hevc_vit.encode.engines.local import encode_local
from hevc_vit.encode.engines.ray import encode_folder
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.result import EncodeResult
from hevc_vit.encode.readers.remote import check_url_packages


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
        return encode_folder(inputs, out_dir, options)
    return encode_local(inputs, out_dir, options)


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
