"""The CLIP-style processor: resize the short side, centre-crop (what the standard tower uses)."""

from __future__ import annotations

from typing import Any

import numpy as np

from hevc_vit.processing.base import SIZE_LIMITS, ImageProcessor, _common_kwargs, _is_int
from hevc_vit.processing.pixels import (
    center_crop,
    short_side_size,
)


class FixedSizeProcessor(ImageProcessor):
    """CLIP style: resize so the short side is ``shortest_edge``, centre-crop to ``crop_size``.

    Matches transformers' ``CLIPImageProcessor`` on the same image: the long side becomes
    ``int(shortest_edge * long / short)``, PIL resampling, the crop starts at ``(H - h) // 2``, and an image
    smaller than the crop is padded with zeros around it.
    """

    processor_type = "CLIPImageProcessor"
    type_names = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor")

    def __init__(
        self,
        shortest_edge: int = 448,
        crop_size: int | tuple[int, int] | None = None,
        do_resize: bool = True,
        do_center_crop: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        crop = (shortest_edge, shortest_edge) if crop_size is None else crop_size
        crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        for name, value in (("shortest_edge", shortest_edge), ("crop_size", crop)):
            values = value if isinstance(value, tuple) else (value,)
            if not values or not all(_is_int(v) and 1 <= v <= SIZE_LIMITS["side"] for v in values):
                raise ValueError(f"{name}={value!r}; expected integers in [1, {SIZE_LIMITS['side']:,}] (pixels)")
        if crop[0] * crop[1] > SIZE_LIMITS["pixels"]:
            raise ValueError(f"crop_size={crop!r} holds {crop[0] * crop[1]:,} pixels; expected at most "
                             f"{SIZE_LIMITS['pixels']:,}")  # fmt: skip
        for name, flag in (("do_resize", do_resize), ("do_center_crop", do_center_crop)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{name}={flag!r}; expected true or false")
        self.shortest_edge = int(shortest_edge)
        self.crop_size = (int(crop[0]), int(crop[1]))  # (height, width)
        self.do_resize = bool(do_resize)
        self.do_center_crop = bool(do_center_crop)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        return short_side_size(height, width, self.shortest_edge) if self.do_resize else (height, width)

    def output_size(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, int]:
        return self.crop_size if self.do_center_crop else self._resized_size(height, width)

    def _resize_target(self, height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
        return self._resized_size(height, width)

    def _crop(self, pixels: np.ndarray) -> np.ndarray:
        return center_crop(pixels, *self.crop_size) if self.do_center_crop else pixels

    def to_dict(self) -> dict[str, Any]:
        h, w = self.crop_size
        return {
            **super().to_dict(),
            "do_resize": self.do_resize,
            "size": {"shortest_edge": self.shortest_edge},
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": h, "width": w},
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> FixedSizeProcessor:
        size = config.get("size", 448)
        if isinstance(size, dict):
            if "shortest_edge" in size:
                size = size["shortest_edge"]
            elif "height" in size and size.get("height") == size.get("width"):
                size = size["height"]
            else:
                raise ValueError(f"size={size}; expected {{'shortest_edge': N}} or a square {{'height', 'width'}}")
        crop = config.get("crop_size", size)
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        return cls(shortest_edge=size, crop_size=crop, **_common_kwargs(config, ("do_resize", "do_center_crop")))
