"""Processors from files and names: a ``preprocessor_config.json`` (ours or transformers' CLIP ones) to a processor,
and the processor a model gets when none is given (:func:`default_processor`)."""

from __future__ import annotations

from typing import Any

from hevc_vit.files import PREPROCESSOR_NAME
from hevc_vit.processing.processors import (  # noqa: F401  (the loaders were public here before)
    COMMON_KEYS,
    PROCESSOR_TYPES,
    FixedSizeProcessor,
    ImageProcessor,
    NativeResolutionProcessor,
    load_processor,
    processor_from_dict,
)

# type names saved before the native processor took transformers' HEVCViTImageProcessor format -> today's
RENAMED_TYPES = {"HEVCViTNativeImageProcessor": NativeResolutionProcessor.processor_type}


def current_processor_record(record: Any) -> Any:
    """A processor dict recorded by an earlier run (``encode_config.json``) as this version records the same
    processor: an old type name becomes today's; anything else comes back as it is."""
    if isinstance(record, dict) and record.get("image_processor_type") in RENAMED_TYPES:
        return {**record, "image_processor_type": RENAMED_TYPES[record["image_processor_type"]]}
    return record


def default_processor(
    kind: str,
    patch_size: int,
    image_size: int,
    base: ImageProcessor | None = None,
    **native_kwargs: Any,
) -> ImageProcessor:
    """A ``"native"`` or ``"clip"`` processor for a model; normalisation (mean, std, resampling) is taken
    from ``base`` — e.g. the checkpoint's own ``preprocessor_config.json`` — when given."""
    common = {k: v for k, v in base.to_dict().items() if k in COMMON_KEYS} if base is not None else {}
    if kind == "native":
        return NativeResolutionProcessor(patch_size=patch_size, **native_kwargs, **common)
    if kind == "clip":
        if native_kwargs:
            raise ValueError(f"{sorted(native_kwargs)} only apply to the native processor; got processor='clip'")
        if isinstance(base, FixedSizeProcessor):
            return base
        return FixedSizeProcessor(shortest_edge=image_size, crop_size=image_size, **common)
    raise ValueError(f"processor={kind!r}; expected 'native', 'clip' or a path to a {PREPROCESSOR_NAME}")
