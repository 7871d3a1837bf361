"""Every option of ``hevc-vit encode``, declared once.

:class:`EncodeOptions` is the one place an option exists: its field gives the default and the type, and
:func:`option` adds the help text, the check of its value, how the command line spells it, and whether
``encode_config.json`` records it (``record="compare"``: ``--resume`` refuses a different value). The Python
API (``encode(inputs, out_dir, options, **overrides)``) and the command line (``hevc_vit.cli.encode``, whose
parser is generated from these fields) both build an ``EncodeOptions``, so adding an option is adding a field
here, then using it where it does its work.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hevc_vit.configuration import PRESETS
from hevc_vit.encode.options.choices import (
    DEFAULT_DECODE_TIMEOUT,
    DEFAULT_TIMEOUT,
    OUTPUT_FORMATS,
    POOLED_FORMATS,
    STORAGE_DTYPES,
    check_storage_dtype,
)
from hevc_vit.encode.options.values import (
    MAX_FORWARD_TOKENS,
    MAX_FRAMES,
    MAX_PATCHES,
    MAX_RETRIES,
    MAX_WORKERS,
    boolean,
    codec_budget,
    comma_list,
    integer,
    kept_columns,
    names,
    on_off,
    one_of,
    option,
    optional,
    parse_budget,
    positive_int,
    positive_number,
    shard_size,
)
from hevc_vit.media.video import VIDEO_BACKENDS
from hevc_vit.media.video_torchcodec import require_torchcodec
from hevc_vit.processing.processors import ImageProcessor, NativeResolutionProcessor
from hevc_vit.runtime.devices import DTYPES

DEFAULT_OUT = "hevc_vit_features"
DEFAULT_MODEL = "small"
POOL_MODES = ("head", "mean", "none")
DEFAULT_FRAMES, CODEC_FRAMES = 8, 64
ENGINES = ("local", "ray")
RAY_TIMEOUT = 30.0  # seconds a Ray cluster has to answer, by default
RAY_OPTIONS = ("ray_address", "ray_timeout", "decode_cpus", "model_actors")  # options of engine="ray" alone
DEFAULT_CODEC_BUDGET = 0.125  # 8 of 64 frames' worth of patches, the reference's LLaVA pipeline
_NATIVE_DEFAULTS = {k: p.default for k, p in inspect.signature(NativeResolutionProcessor).parameters.items()}


@dataclass(frozen=True)
class EncodeOptions:
    """How ``encode`` turns inputs into features. Each field's help says what it does (the text the command
    line shows); from Python, ``model`` may also be a model object, a weights file or a Hub id ``org/name``,
    and ``processor`` an :class:`ImageProcessor`. Every field is checked on construction (``ValueError`` naming
    the option, its value and what was expected); ``replace(**overrides)`` makes a checked copy.
    ``encode_config.json`` records the fields marked ``record``, and ``--resume`` compares those marked
    ``"compare"``.
    """

    model: str | os.PathLike | torch.nn.Module | None = option(
        None,
        f"checkpoint folder, or a preset ({', '.join(PRESETS)}) with random weights "
        f"(default: {DEFAULT_MODEL}, random: a demo)",
        parse=str,
        metavar="PATH|PRESET",
        record="compare",
    )
    processor: str | os.PathLike | ImageProcessor = option(
        "native",
        "native resolution (default), CLIP fixed size, or a preprocessor_config.json",
        parse=str,
        metavar="native|clip|PATH",
        record="compare",
    )
    min_image_tokens: int | None = option(
        None,
        f"native: fewest patches per image (default {_NATIVE_DEFAULTS['min_tokens']})",
        parse=int,
        metavar="N",
        check=optional(integer(1, MAX_PATCHES)),
    )
    max_image_tokens: int | None = option(
        None,
        f"native: most patches per image (default {_NATIVE_DEFAULTS['max_tokens']})",
        parse=int,
        metavar="N",
        check=optional(integer(1, MAX_PATCHES)),
    )
    max_video_tokens: int | None = option(
        None,
        f"native: most patches per clip (default {_NATIVE_DEFAULTS['max_video_tokens']})",
        parse=int,
        metavar="N",
        check=optional(integer(1, MAX_PATCHES)),
    )
    jpeg_draft: bool = option(
        True,
        "JPEGs at least twice their target size: decode at 1/2, 1/4 or 1/8 scale, then resize (faster; pixels 1-2 "
        "levels of 255 off a full decode on average, see hevc-vit bench --pipeline): on (default) or off",
        parse=on_off,
        metavar="on|off",
        check=boolean,
        record="compare",
        before=False,  # runs made before the option decoded every JPEG in full
    )
    exif_transpose: bool = option(
        True,
        "images whose EXIF orientation says they are stored sideways or mirrored (phone photos) are turned upright "
        "first, as transformers' load_image and datasets do: on (default) or off (the pixels as stored)",
        parse=on_off,
        metavar="on|off",
        check=boolean,
        record="compare",
        before=False,  # runs made before the option used the pixels as stored
    )
    pool: str | None = option(
        None,
        "pooled vector per item: head (default with a head), mean, none",
        parse=str,
        choices=POOL_MODES,
        check=optional(one_of(POOL_MODES)),
        record="compare",
    )
    pooled_only: bool = option(False, "save pooled vectors only, not patch features", check=boolean, record="compare")
    normalize: bool = option(
        False,
        "L2-normalise the pooled vectors (unit length, for cosine search; patch features are stored as computed); "
        "always on with --output-format clip-retrieval",
        check=boolean,
        record="compare",
        before=False,  # runs made before the option stored the vectors as computed
    )
    max_tokens: int = option(
        16384,
        "patch budget of one forward ({default})",
        parse=int,
        metavar="N",
        check=integer(1, MAX_FORWARD_TOKENS),
        record="note",
    )
    frames: int | None = option(
        None,
        f"frames sampled uniformly per video (default {DEFAULT_FRAMES}; {CODEC_FRAMES} with --codec-sparse)",
        parse=int,
        metavar="N",
        check=optional(integer(1, MAX_FRAMES)),
        record="compare",
    )
    temporal_context: int | None = option(
        None,
        "spread the frames' temporal positions over 0..N-1 (e.g. 64); default: 0..frames-1",
        parse=int,
        metavar="N",
        check=optional(integer(1, MAX_PATCHES)),
        record="compare",
    )
    video_backend: str = option(
        "pyav",
        "decoder of the sampled video frames: pyav (default) or torchcodec (pip install torchcodec; needs FFmpeg)",
        parse=str,
        choices=VIDEO_BACKENDS,
        check=one_of(VIDEO_BACKENDS),
        record="compare",
    )
    codec_sparse: bool = option(
        False,
        "videos: encode only the patches that change (hevc_vit.codec), at their true (t, h, w)",
        check=boolean,
        record="compare",
    )
    codec_budget: float = option(
        DEFAULT_CODEC_BUDGET,
        "codec-sparse: patches kept per clip, a count K or a ratio in (0, 1] ({default})",
        parse=parse_budget,
        metavar="K|RATIO",
        check=codec_budget,
        record="compare",
    )
    codec_preview_dir: str | os.PathLike | None = option(
        None, "codec-sparse: also draw each clip's kept patches to DIR/<key>.png", parse=str, metavar="DIR"
    )
    device: str | torch.device | None = option(
        None, "cpu, cuda, cuda:N (default: this rank's GPU if any, else cpu)", parse=str
    )
    dtype: str | torch.dtype | None = option(
        "auto",
        "compute and storage dtype (auto: bfloat16 on GPUs; on CPUs bfloat16 where a one-time matmul "
        "measurement finds it >= 1.2x float32, else float32; the run says which)",
        parse=str,
        choices=("auto", *DTYPES),
        record="compare",
    )
    attn_implementation: str | None = option(
        None,
        "attention backend: auto, eager, sdpa, torch_varlen, flash_attn (default: the model's)",
        parse=str,
        metavar="NAME",
    )
    workers: int | None = option(
        None,
        "processes for decoding (default: up to 4)",
        parse=int,
        metavar="N",
        check=optional(integer(0, MAX_WORKERS)),
    )
    decode_timeout: float = option(
        DEFAULT_DECODE_TIMEOUT,
        "seconds a decoding worker may spend on one input before it is ended and the input fails, the run going "
        "on ({default}; with --workers 0 loading runs in this process, unbounded)",
        parse=float,
        metavar="SECONDS",
        check=positive_number,
    )
    engine: str = option(
        "local",
        "local: this machine (torchrun for several GPUs); ray: a Ray cluster, decoding and the model scaled apart",
        parse=str,
        choices=ENGINES,
        check=one_of(ENGINES),
    )
    ray_address: str | None = option(
        None,
        "--engine ray: the cluster to join (auto: the one `ray start` made here; default: $RAY_ADDRESS, else start a "
        "local one, listening on 127.0.0.1 only)",
        parse=str,
        metavar="ADDRESS",
    )
    ray_timeout: float | None = option(
        None,
        f"--engine ray: seconds the cluster at --ray-address has to answer before the run is refused "
        f"(default {RAY_TIMEOUT:g})",
        parse=float,
        metavar="S",
        check=optional(positive_number),
    )
    decode_cpus: int | None = option(
        None,
        "--engine ray: decoding tasks at once, a CPU each (default: as many as the cluster has room for)",
        parse=int,
        metavar="N",
        check=optional(integer(1, 1 << 16)),
    )
    model_actors: int | None = option(
        None,
        "--engine ray: model replicas, a GPU each (default: one per GPU; without GPUs, one CPU actor of one thread)",
        parse=int,
        metavar="N",
        check=optional(integer(1, 1 << 12)),
    )
    shard_size_mb: float = option(1024, "features per shard ({default})", parse=float, metavar="MB", check=shard_size)
    path_column: str | None = option(
        None, "tables: the column of paths or URLs (default: the first of path, url, image)", parse=str, metavar="NAME"
    )
    keep_columns: tuple[str, ...] = option(
        (),
        "tables and datasets: columns copied into each index row (comma-separated)",
        parse=comma_list,
        metavar="A,B",
        check=kept_columns,
    )
    image_column: str = option(
        "image", "datasets: the column holding the images ({default})", parse=str, metavar="NAME", check=names
    )
    retries: int = option(
        2,
        "URLs: attempts after a failed read before the input fails ({default})",
        parse=int,
        metavar="N",
        check=integer(0, MAX_RETRIES),
    )
    timeout: float = option(
        DEFAULT_TIMEOUT,
        "URLs (http(s), s3): seconds a connection, and each read, may wait before the attempt fails ({default})",
        parse=float,
        metavar="SECONDS",
        check=positive_number,
    )
    output_format: str = option(
        "safetensors",
        "safetensors shards (default), npy-parquet (pooled embeddings .npy + metadata .parquet), parquet, "
        "clip-retrieval (img_emb/img_emb_N.npy + metadata/metadata_N.parquet, normalised: clip-retrieval index "
        "and autofaiss read the folder as it is)",
        parse=str,
        choices=OUTPUT_FORMATS,
        check=one_of(OUTPUT_FORMATS),
        record="compare",
    )
    storage_dtype: str | None = option(
        None,
        "dtype the features are stored in (default: float16 for npy-parquet, else the compute dtype)",
        parse=str,
        choices=STORAGE_DTYPES,
        check=optional(one_of(STORAGE_DTYPES)),
        record="compare",
    )
    resume: bool = option(False, "continue DIR: skip inputs already encoded there", check=boolean)
    overwrite: bool = option(False, "replace the outputs of an earlier run in DIR", check=boolean)
    progress: bool | None = option(None, "tqdm bar on stderr (None: when stderr is a terminal, on rank 0)", cli=False)
    log: Callable[[str], None] | None = option(None, "where notices go (default: stderr, rank 0 only)", cli=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = f.metadata["check"](value) if f.metadata["check"] else ""
            if expected:
                raise ValueError(f"{f.name}={value!r}; expected {expected}")
        low, high = self.min_image_tokens, self.max_image_tokens
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_image_tokens={low} and max_image_tokens={high}; expected min <= max")
        context, frames = self.temporal_context, self.video_frames
        if context is not None and (positive_int(context) or context < frames):
            raise ValueError(f"temporal_context={context!r}; expected an integer of at least frames={frames}")
        if self.codec_preview_dir is not None and not self.codec_sparse:
            raise ValueError("codec_preview_dir was given without codec_sparse; the preview draws a codec selection")
        ray_only = [name for name in RAY_OPTIONS if getattr(self, name) is not None]
        if ray_only and self.engine != "ray":
            raise ValueError(f"{ray_only[0]} was given with engine={self.engine!r}; it applies to engine='ray'")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite were both given; --resume continues a run, --overwrite replaces it")
        if self.video_backend == "torchcodec" and self.codec_sparse:
            raise ValueError(
                "video_backend='torchcodec' with codec_sparse; the codec selection reads the stream through PyAV: "
                "use video_backend='pyav' (the default) with codec_sparse"
            )
        if self.video_backend == "torchcodec":  # missing or unloadable: refused before anything is created
            require_torchcodec()
        if self.output_format in POOLED_FORMATS and self.pool == "none":
            raise ValueError(
                f"output_format={self.output_format!r} with pool='none'; it stores pooled embeddings: pool head or mean"
            )
        if self.normalize and self.pool == "none":
            raise ValueError("normalize with pool='none'; it normalises the pooled vectors: pool head or mean")
        check_storage_dtype(self.output_format, self.storage_dtype)

    def say(self, message: str) -> None:
        """A notice for people: to ``log``, else to stderr."""
        if self.log is not None:
            self.log(message)
        else:
            print(message, file=sys.stderr, flush=True)

    @property
    def stores_pooled_only(self) -> bool:
        """Only pooled vectors are stored: asked for, or a format that stores the pooled embeddings alone."""
        return self.pooled_only or self.output_format in POOLED_FORMATS

    @property
    def normalizes(self) -> bool:
        """The pooled vectors are L2-normalised: asked for, or the clip-retrieval layout (its index expects it)."""
        return self.normalize or self.output_format == "clip-retrieval"

    @property
    def video_frames(self) -> int:
        """Frames sampled per video: ``frames``, else 8 (64 with ``codec_sparse``, as the reference does)."""
        return self.frames or (CODEC_FRAMES if self.codec_sparse else DEFAULT_FRAMES)

    def replace(self, **overrides: Any) -> EncodeOptions:
        """A copy with ``overrides`` (validated); an unknown name raises ``TypeError`` listing the options."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown encode options {unknown}; expected some of: {names}")
        return dataclasses.replace(self, **overrides)


def recorded_options(how: str | None = None) -> tuple[str, ...]:
    """Names of the options ``encode_config.json`` records (with ``how``: only those recorded that way)."""
    return tuple(
        f.name
        for f in dataclasses.fields(EncodeOptions)
        if f.metadata["record"] and (how is None or f.metadata["record"] == how)
    )
