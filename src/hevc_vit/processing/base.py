"""The processors' shared base (:class:`ImageProcessor`: normalisation, frames, (de)serialisation), their limits,
and reading a ``preprocessor_config.json`` into the class its ``image_processor_type`` names.

The subclasses (:mod:`.fixed`, :mod:`.native`) enter :data:`PROCESSOR_TYPES` when they are defined; import them
through :mod:`.processors`, which defines both, before reading a file.
Legend: ``p`` patch size, ``h``/``w`` sides in patches, ``T`` frames.
"""

from __future__ import annotations

import abc
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hevc_vit.files import PREPROCESSOR_NAME, write_json_atomic
from hevc_vit.packing import check_sides
from hevc_vit.processing.pixels import (
    draft_jpeg,
    normalizer_for,
    to_8bit,
    to_rgb,
    turn_upright,
    upright_size,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as stored in preprocessor_config.json files
RESAMPLE_NAMES = {int(r): r.name for r in Image.Resampling}  # PIL's filters: 0 NEAREST, ..., 3 BICUBIC, ...
# sizes far above any real use, low enough that a processor never allocates gigabytes for one image (or overflows
# PIL): patches per image and per clip, the patch side (the model config's bound), a side and the pixels of an image
SIZE_LIMITS = {"tokens": 1 << 16, "video_tokens": 1 << 20, "patch_size": 1024, "side": 1 << 14, "pixels": 1 << 27}


# image_processor_type -> class: every name a subclass reads (its ``type_names``), filled as subclasses are defined
PROCESSOR_TYPES: dict[str, type[ImageProcessor]] = {}


class ImageProcessor(abc.ABC):
    """Shared normalisation, frame handling and (de)serialisation; subclasses choose the output size."""

    processor_type: str = ""  # the ``image_processor_type`` this class saves
    # every ``image_processor_type`` this class reads (its own first), filled into PROCESSOR_TYPES on definition
    type_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("type_names", ()):  # declared by this class, not inherited
            PROCESSOR_TYPES[name] = cls

    def __init__(
        self,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        resample: int = BICUBIC,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
    ):
        image_mean = _finite_list("image_mean", image_mean)
        image_std = _finite_list("image_std", image_std)
        if len(image_mean) != len(image_std):
            raise ValueError(f"image_mean={image_mean} and image_std={image_std}; expected equal lengths")
        if any(s <= 0 for s in image_std):
            raise ValueError(f"image_std={image_std}; expected positive values")
        if not _is_number(resample) or not math.isfinite(resample) or resample not in RESAMPLE_NAMES:
            known = ", ".join(f"{k} ({v})" for k, v in RESAMPLE_NAMES.items())
            raise ValueError(f"resample={resample!r}; expected one of PIL's resampling filters: {known}")
        if not _is_number(rescale_factor) or not math.isfinite(rescale_factor) or rescale_factor <= 0:
            raise ValueError(f"rescale_factor={rescale_factor!r}; expected a finite positive number (e.g. 1/255)")
        flags = (("do_rescale", do_rescale), ("do_normalize", do_normalize), ("do_convert_rgb", do_convert_rgb))
        for name, flag in flags:
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{name}={flag!r}; expected true or false")
        self.image_mean = image_mean
        self.image_std = image_std
        self.resample = int(resample)
        self.rescale_factor = float(rescale_factor)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)
        self.do_convert_rgb = bool(do_convert_rgb)

    # -- the size rule, per subclass -------------------------------------------------------------------

    @abc.abstractmethod
    def output_size(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, int]:
        """``(H, W)`` in pixels of the processed image (``num_frames=None``) or of every frame of a ``num_frames``
        clip (a list of frames, even of one, is a clip)."""

    @abc.abstractmethod
    def _resize_target(self, height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` a ``height x width`` image is resized to on its way to ``size = output_size(...)``."""

    def _crop(self, pixels: np.ndarray) -> np.ndarray:  # the resized (H, W, C) pixels to output_size
        return pixels

    def frames_that_fit(self, num_frames: int) -> int:
        """The most frames, up to ``num_frames``, that one clip can hold (a fixed size: all of them)."""
        return num_frames

    # -- processing ------------------------------------------------------------------------------------

    def __call__(self, images: Image.Image | Sequence[Image.Image], draft: bool = False) -> torch.Tensor:
        """One PIL image -> ``(C, H, W)`` float32; ``T`` frames -> ``(C, T, H, W)``; ``draft``: see :meth:`pixels`."""
        x = self._tensor(self._frame_pixels(images, draft))  # (C, T, H, W)
        return x[:, 0] if isinstance(images, Image.Image) else x

    def process(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """One image (e.g. a video frame sized for its whole clip) at ``size = (H, W)``: ``(C, H, W)`` float32."""
        return self._tensor(self.pixels(image, size)[None])[:, 0]  # (C, H, W)

    def patchify(
        self,
        images: Image.Image | Sequence[Image.Image],
        patch_size: int,
        draft: bool = False,
        normalize: bool = True,
        orientation: int = 1,
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """An image or a clip's frames straight to ``(t·h·w, C·p·p)`` float32 patches and ``(t, h, w)``: the same
        values as ``patchify(self(images))`` (:func:`hevc_vit.packing.patchify`), without the float image in
        between. ``draft``: as in :meth:`pixels`. ``normalize=False``: 8-bit samples come back as uint8 patches,
        for :func:`~.pixels.normalize_patches` with :attr:`normalization` where they are used. ``orientation``: an
        image's EXIF orientation (:func:`~.pixels.exif_orientation`); 2..8 turn it upright first, as transformers'
        ``load_image`` does."""
        pixels = self._frame_pixels(images, draft, orientation)  # (T, H, W, C)
        T, H, W, C = pixels.shape
        check_sides("the processed image", H, W, patch_size)
        patches = normalizer_for(*self.normalization).patches(pixels, patch_size, normalize)  # (T·h·w, C·p·p)
        return torch.from_numpy(patches), (T, H // patch_size, W // patch_size)

    def pixels(
        self, image: Image.Image, size: tuple[int, int], draft: bool = False, orientation: int = 1
    ) -> np.ndarray:
        """``image`` resized (and cropped) to ``size = output_size(...)``, before normalisation: ``(H, W, C)``.
        draft: a JPEG not decoded yet decodes at a reduced DCT scale (:func:`~.pixels.draft_jpeg`), then is resized
        the rest of the way: a fraction of the work, pixels slightly off a full decode's (``hevc-vit bench --pipeline``
        measures by how much). orientation: EXIF's; 2..8 turn the image upright before the resize (``size`` is
        the upright image's)."""
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image is {image.width}x{image.height}; expected at least 1x1 pixels")
        H, W = self._resize_target(*upright_size(image.height, image.width, orientation), size)
        box = draft_jpeg(image, upright_size(H, W, orientation)) if draft else None  # the target as stored
        image = to_8bit(image)  # a 16-bit PNG is scaled, not clipped at 255 (white)
        if self.do_convert_rgb:
            image = to_rgb(image)
        image, box = turn_upright(image, orientation, box)
        if box is not None or (H, W) != (image.height, image.width):
            image = image.resize((W, H), resample=self.resample, box=box)
        pixels = np.asarray(image)
        return self._crop(pixels[:, :, None] if pixels.ndim == 2 else pixels)

    def _frame_pixels(self, images: Image.Image | Sequence[Image.Image], draft: bool, orientation: int = 1):
        """``(T, H, W, C)``: one image (``T = 1``) or the frames of a clip, all at the clip's size."""
        if isinstance(images, Image.Image):
            size = self.output_size(*upright_size(images.height, images.width, orientation))
            return self.pixels(images, size, draft, orientation)[None]
        frames = list(images)
        if not frames:
            raise ValueError("images is an empty list; expected a PIL image or a list of video frames")
        first = frames[0]
        for i, frame in enumerate(frames):
            if frame.size != first.size:
                raise ValueError(f"frame {i} is {frame.width}x{frame.height}; frame 0 is {first.width}x{first.height}")
        size = self.output_size(first.height, first.width, num_frames=len(frames))
        return np.stack([self.pixels(frame, size, draft) for frame in frames])

    def _tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """``(T, H, W, C)`` samples -> normalised ``(C, T, H, W)`` float32."""
        return torch.from_numpy(normalizer_for(*self.normalization)(pixels)).permute(3, 0, 1, 2).contiguous()

    @property
    def normalization(self) -> tuple[list[float], list[float], float, bool, bool]:
        """``(image_mean, image_std, rescale_factor, do_rescale, do_normalize)``: the arguments of the normalisation
        functions of :mod:`.pixels`."""
        return self.image_mean, self.image_std, self.rescale_factor, self.do_rescale, self.do_normalize

    # -- serialisation ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": self.processor_type,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "do_convert_rgb": self.do_convert_rgb,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``folder`` (created if needed); returns the file's path."""
        path = Path(folder) / PREPROCESSOR_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessor:
        """Load a ``preprocessor_config.json`` (or a folder holding one); the file's type picks the class."""
        return load_processor(path)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        fields = {k: v for k, v in self.to_dict().items() if k != "image_processor_type"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _finite_list(name: str, values: Any) -> list[float]:
    """``values`` as a list of finite floats; ``ValueError`` naming ``name`` for NaN, inf, strings, a scalar."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)) or len(values) == 0:
        raise ValueError(f"{name}={values!r}; expected a non-empty list of finite numbers, one per channel")
    if not all(_is_number(v) and math.isfinite(v) for v in values):
        raise ValueError(f"{name}={list(values)!r}; expected finite numbers (no NaN, inf or strings)")
    return [float(v) for v in values]


# the settings every processor has, under the names of preprocessor_config.json
COMMON_KEYS = ("image_mean", "image_std", "resample", "rescale_factor", "do_rescale", "do_normalize", "do_convert_rgb")


def _common_kwargs(config: dict[str, Any], extra: Sequence[str]) -> dict[str, Any]:
    return {k: config[k] for k in (*COMMON_KEYS, *extra) if k in config}


def processor_from_dict(config: dict[str, Any]) -> ImageProcessor:
    """The processor a ``preprocessor_config.json`` dict describes (its ``image_processor_type`` decides)."""
    kind = config.get("image_processor_type") or config.get("feature_extractor_type")
    if kind not in PROCESSOR_TYPES:
        raise ValueError(f"image_processor_type={kind!r}; expected one of {sorted(PROCESSOR_TYPES)}")
    return PROCESSOR_TYPES[kind].from_dict(config)


def load_processor(path: str | os.PathLike) -> ImageProcessor:
    """Load a processor from a ``preprocessor_config.json`` file or a folder that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / PREPROCESSOR_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a {PREPROCESSOR_NAME} file or a folder holding one")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return processor_from_dict(config)
