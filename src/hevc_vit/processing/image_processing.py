"""A transformers image processor for the packing model: native resolution in, packed patches out.

``HEVCViTImageProcessor`` follows the contract of Qwen2-VL's image processor: any number of images of any
sizes (PIL, numpy or torch; one or a list) become ``pixel_values (T, C·p·p)`` — the flattened ``(C, p, p)``
patches of every image, back to back — and ``image_grid_thw (n, 3)``, one ``(1, h, w)`` row per image.
Each image keeps its aspect ratio with both sides multiples of the patch size and between ``min_tokens``
and ``max_tokens`` patches: the resizing and normalisation of ``hevc-vit encode``'s native processor,
which it runs, so both give the same numbers. It is a ``BaseImageProcessor``: ``save_pretrained`` /
``from_pretrained`` use ``preprocessor_config.json``, ``AutoImageProcessor`` finds it once ``hevc_vit`` is
imported, and ``pipeline("image-feature-extraction", model=folder)`` runs every image at its own size
(both models take ``pixel_values`` + ``image_grid_thw``). Its file is the one ``hevc-vit encode``'s native
processor saves and reads: one format for both.

Legend: ``T`` packed patches, ``n`` images, ``p`` patch size, ``C`` channels, ``h``/``w`` sides in patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from hevc_vit.packing import patchify_items
from hevc_vit.processing.processors import BICUBIC, CLIP_MEAN, CLIP_STD, NativeResolutionProcessor

# the settings, with their defaults; saved in preprocessor_config.json
_SETTINGS: dict[str, Any] = {
    "patch_size": 14,
    "min_tokens": 256,
    "max_tokens": 4096,
    "max_video_tokens": 8192,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "resample": BICUBIC,
    "rescale_factor": 1 / 255,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
}


class HEVCViTImageProcessor(BaseImageProcessor):
    """Images of any sizes -> ``pixel_values (T, C·p·p)`` float32 and ``image_grid_thw (n, 3)`` int64.

    Args (saved in ``preprocessor_config.json``): ``patch_size`` (14), ``min_tokens`` (256) and ``max_tokens``
    (4096) patches per image, ``max_video_tokens`` (8192, for ``hevc-vit encode``'s clips), ``image_mean`` /
    ``image_std`` (CLIP's), ``resample`` (PIL's 3, bicubic), ``rescale_factor`` (1/255), ``do_rescale``,
    ``do_normalize``, ``do_convert_rgb`` (all True). Invalid values raise ``ValueError`` naming them.

    The file is the one ``hevc-vit encode``'s native processor saves and reads (``image_processor_type``
    ``HEVCViTImageProcessor``), so a folder saved by either opens with both.
    """

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, **kwargs: Any):
        settings = {name: kwargs.pop(name, default) for name, default in _SETTINGS.items()}
        super().__init__(**kwargs)
        for name, value in settings.items():
            setattr(self, name, value)
        self.native_processor()  # validates every setting now, not at the first image

    def native_processor(self, **overrides: Any) -> NativeResolutionProcessor:
        """The encode pipeline's native processor with these settings (and ``overrides``)."""
        settings = {name: getattr(self, name) for name in _SETTINGS}
        settings.update(overrides)
        return NativeResolutionProcessor(**settings)

    def preprocess(self, images: Any, return_tensors: str | None = None, **overrides: Any) -> BatchFeature:
        """images: one image or a list — PIL images, numpy arrays ``(H, W, C)`` / ``(C, H, W)`` / ``(H, W)`` and
        torch tensors ``(C, H, W)`` (uint8, or floats in [0, 1]). ``overrides`` replace settings for this call.
        Returns ``pixel_values (T, C·p·p)`` and ``image_grid_thw (n, 3)`` (``return_tensors``: None or ``"pt"``
        keeps torch tensors, ``"np"`` gives numpy)."""
        unknown = sorted(set(overrides) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"unknown image processor arguments {unknown}; expected some of {sorted(_SETTINGS)}")
        processor = self.native_processor(**overrides)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("images is an empty list; expected at least one image")
        pixels = [processor(as_pil_image(image, f"image {i}")) for i, image in enumerate(items)]  # (C, H, W) each
        patches, grid_thw = patchify_items(pixels, processor.patch_size, pixels[0].shape[0])
        tensor_type = None if return_tensors in (None, "pt") else return_tensors
        return BatchFeature(data={"pixel_values": patches, "image_grid_thw": grid_thw}, tensor_type=tensor_type)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict (every setting), under this class's name also for :class:`HEVCViTNativeImageProcessor`."""
        return {**super().to_dict(), "image_processor_type": HEVCViTImageProcessor.__name__}


class HEVCViTNativeImageProcessor(HEVCViTImageProcessor):
    """The name ``hevc-vit encode`` saved its native processor under before the two shared one format: lets
    ``AutoImageProcessor`` open those files (saving again writes ``HEVCViTImageProcessor``)."""


def as_pil_image(image: Any, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a numpy array or a torch tensor (channels first or last; uint8, or
    floats in [0, 1]); anything else raises ``ValueError`` naming ``what``."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype == torch.bfloat16:  # numpy has no bfloat16
            image = image.float()
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} is a {type(image).__name__}; expected a PIL image, a numpy array or a torch tensor")
    array = image
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"{what} has shape {image.shape}; expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ValueError(f"{what} has dtype {array.dtype}; expected uint8, or finite floats in [0, 1]")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise ValueError(f"{what} holds values in [{low:.3g}, {high:.3g}]; expected floats in [0, 1] (or uint8)")
        array = np.round(array * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))
