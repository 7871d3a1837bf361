"""The packing model's own processor: keep the aspect ratio, sides multiples of the patch size, bounded patches."""

from __future__ import annotations

from typing import Any

from hevc_vit.processing.base import SIZE_LIMITS, ImageProcessor, _common_kwargs, _is_int
from hevc_vit.processing.pixels import (
    native_grid_size,
)


class NativeResolutionProcessor(ImageProcessor):
    """Native resolution: keep the aspect ratio; sides are multiples of ``patch_size``; an image gets between
    ``min_tokens`` and ``max_tokens`` patches (an image already inside the bounds only rounds its sides to
    the nearest multiple of the patch size; a smaller one is enlarged, a larger one shrunk).

    A video frame gets the same rule with its maximum lowered to ``max_video_tokens // T``, so a clip of ``T``
    frames holds at most ``max_video_tokens`` patches, and its minimum kept at ``min_tokens``: a clip holds at most
    ``max_video_tokens // min_tokens`` frames (:meth:`frames_that_fit`; more raise ``ValueError``, and
    ``hevc-vit encode`` samples that many instead).

    Aspect ratio: each side is within one patch of the ideal side at one scale for both (a side under one patch
    at that scale becomes one patch). Bounds so close that no such grid falls between them (a frame at exactly
    the minimum) give the largest such grid under the maximum, a few patches under the minimum.
    """

    # the file format of transformers' HEVCViTImageProcessor (hevc_vit.processing.image_processing), which runs this
    # class: one preprocessor_config.json that AutoImageProcessor, pipeline() and hevc-vit encode all read
    processor_type = "HEVCViTImageProcessor"
    type_names = ("HEVCViTImageProcessor", "HEVCViTNativeImageProcessor")  # and what round 2 saved

    def __init__(
        self,
        patch_size: int = 14,
        min_tokens: int = 256,
        max_tokens: int = 4096,
        max_video_tokens: int = 8192,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        for name, value, hi in (
            ("patch_size", patch_size, SIZE_LIMITS["patch_size"]),
            ("min_tokens", min_tokens, SIZE_LIMITS["tokens"]),
            ("max_tokens", max_tokens, SIZE_LIMITS["tokens"]),
            ("max_video_tokens", max_video_tokens, SIZE_LIMITS["video_tokens"]),
        ):
            if not _is_int(value) or not 1 <= value <= hi:
                raise ValueError(f"{name}={value!r}; expected a positive integer in [1, {hi:,}]")
        if min_tokens > max_tokens:
            raise ValueError(f"min_tokens={min_tokens} > max_tokens={max_tokens}; expected min_tokens <= max_tokens")
        most = SIZE_LIMITS["pixels"] // patch_size**2  # max_tokens patches of patch_size² pixels
        if max_tokens > most:
            raise ValueError(f"max_tokens={max_tokens} with patch_size={patch_size}; expected max_tokens <= {most:,} "
                             f"(at most {SIZE_LIMITS['pixels']:,} pixels per image)")  # fmt: skip
        self.patch_size, self.min_tokens = int(patch_size), int(min_tokens)
        self.max_tokens, self.max_video_tokens = int(max_tokens), int(max_video_tokens)

    def token_bounds(self, num_frames: int | None = None) -> tuple[int, int]:
        """``(min, max)`` patches of an image (``num_frames=None``) or of each frame of a ``num_frames`` clip
        (``ValueError`` for more frames than :meth:`frames_that_fit`)."""
        if num_frames is None:
            return self.min_tokens, self.max_tokens
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r}; expected None (an image) or a positive frame count")
        fit = self.frames_that_fit(num_frames)
        if fit < num_frames:
            raise ValueError(
                f"a clip of {num_frames} frames needs at least {num_frames} x min_tokens={self.min_tokens} = "
                f"{num_frames * self.min_tokens} patches, more than max_video_tokens={self.max_video_tokens}; "
                f"expected at most {fit} frames (or a larger max_video_tokens, or a smaller min_tokens)"
            )
        return self.min_tokens, min(self.max_tokens, self.max_video_tokens // num_frames)

    def frames_that_fit(self, num_frames: int) -> int:
        """The most frames, up to ``num_frames``, that ``max_video_tokens`` holds at ``min_tokens`` each (maybe 0)."""
        return min(num_frames, self.max_video_tokens // self.min_tokens)

    def grid_size(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, int]:
        """``(h, w)`` in patches for an image (or every frame of a clip) of ``height x width`` pixels."""
        lo, hi = self.token_bounds(num_frames)
        return native_grid_size(height, width, self.patch_size, lo, hi)

    def output_size(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, int]:
        h, w = self.grid_size(height, width, num_frames)
        return h * self.patch_size, w * self.patch_size

    def _resize_target(self, height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "patch_size": self.patch_size,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "max_video_tokens": self.max_video_tokens,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> NativeResolutionProcessor:
        names = ("patch_size", "min_tokens", "max_tokens", "max_video_tokens")
        return cls(**_common_kwargs(config, names))
