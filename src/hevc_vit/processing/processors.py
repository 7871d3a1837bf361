"""Image processors: PIL images (or video frames) -> normalised pixel tensors ready for ``patchify``.

Two processors, both saved and loaded as ``preprocessor_config.json``:

    FixedSizeProcessor          CLIP style, what the standard tower uses: resize the short side, centre-crop
                                to ``image_size``, CLIP mean/std. Saved with the keys of transformers'
                                ``CLIPImageProcessor`` (which loads the file too), and reads that class's files.
    NativeResolutionProcessor   the packing model's own: keep the aspect ratio, both sides multiples of the
                                patch size, the patch count of an image between ``min_tokens`` and ``max_tokens``.
                                Saved as ``HEVCViTImageProcessor`` (transformers' class of this library, which
                                loads the file too); reads round 2's ``HEVCViTNativeImageProcessor`` files.

Both return float32 ``(C, H, W)`` for one image and ``(C, T, H, W)`` for a list of ``T`` frames (all frames of a
clip get one size), or patches straight away (``patchify``); the pixel steps are pure functions in :mod:`.pixels`;
the shared base and reading a file: :mod:`.base`; choosing a processor for a model: :mod:`.files`.
Legend: ``p`` patch size, ``h``/``w`` sides in patches, ``T`` frames.
"""

from hevc_vit.processing.base import (  # noqa: F401  (this module is where the processors are imported from)
    BICUBIC,
    CLIP_MEAN,
    CLIP_STD,
    COMMON_KEYS,
    PROCESSOR_TYPES,
    RESAMPLE_NAMES,
    SIZE_LIMITS,
    ImageProcessor,
    load_processor,
    processor_from_dict,
)
from hevc_vit.processing.fixed import FixedSizeProcessor  # noqa: F401
from hevc_vit.processing.native import NativeResolutionProcessor  # noqa: F401
