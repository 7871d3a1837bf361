"""What the loader gives (:class:`LoadedItem`: one input ready for the encoder, or the reason it is not) and what it
takes (:class:`LoadOptions`): a leaf of the decode stage, shared by :mod:`.load`, :mod:`.sparse` and the engines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hevc_vit.codec.config import CodecSparseConfig
from hevc_vit.encode.options.choices import DEFAULT_DECODE_TIMEOUT
from hevc_vit.encode.readers.remote import Network
from hevc_vit.processing.pixels import normalize_patches
from hevc_vit.processing.processors import ImageProcessor


@dataclass
class LoadedItem:
    """One input ready for the encoder, or the reason it is not.

    patches: ``(N, C·p·p)``, float32, or uint8 when ``normalization`` is set: 8-bit samples, normalised where they
    are used (:meth:`float_patches`, or on the model's device) — a quarter of the bytes between processes and to
    the device, and none of the float work in the loader; grid_thw: ``(t, h, w)`` in patches; positions: ``(N, 3)``
    int64 ``(t, h, w)`` RoPE positions (explicit for videos spread over a temporal context, else the grid's own).
    normalization: the processor's ``(mean, std, rescale_factor, do_rescale, do_normalize)`` for uint8 patches.
    """

    index: int
    path: str
    kind: str = ""  # "image" or "video"
    patches: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None
    positions: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    error: str = ""
    normalization: tuple | None = None

    @property
    def num_tokens(self) -> int:
        """Patches the encoder runs: all of the grid, or the kept ones of a codec-sparse clip."""
        if self.patches is not None:
            return self.patches.shape[0]
        t, h, w = self.grid_thw
        return t * h * w

    def float_patches(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``patches`` as float32 ``(N, C·p·p)`` on ``device`` (default: where they are): uint8 samples are
        moved first, then normalised there, with exactly the processor's values."""
        patches = self.patches if device is None else self.patches.to(device, non_blocking=True)
        return patches if self.normalization is None else normalize_patches(patches, *self.normalization)


@dataclass
class LoadOptions:
    """What ``load_item`` needs besides the path."""

    processor: ImageProcessor
    patch_size: int
    num_channels: int = 3
    frames: int = 8
    temporal_context: int | None = None
    codec: CodecSparseConfig | None = None  # videos: encode only the selected patches
    preview_dir: str | os.PathLike | None = None
    memory: list = field(default_factory=list)  # the run's in-memory inputs (objects, datasets), by number
    network: Network = Network()  # URLs: timeouts, and attempts after a failed read before the input fails
    jpeg_draft: bool = True  # JPEGs at least twice the target decode at a reduced DCT scale (as encode does by default)
    exif_transpose: bool = True  # images turned upright as their EXIF orientation says (transformers' load_image does)
    keys: Sequence[str] = ()  # the shard key of item ``index`` (names a codec preview); empty: item_key(index)
    video_backend: str = "pyav"  # decoder of the sampled frames: pyav or torchcodec (.video.read_video)
    decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT  # seconds a worker process may spend on one input
