"""``hevc-vit encode``: native-resolution features for files and folders of images and videos.

The Python API is :func:`encode` with :class:`EncodeOptions`; the command line (``hevc_vit.cli.encode``)
only parses and calls it. Reading the features back: :func:`read_index`, :func:`iter_features`,
:func:`load_features`.

Pipeline, per rank (:mod:`.runner`): rank 0 expands the inputs to work units (:mod:`.sources`; a file, a tar
shard, a parquet row group: :mod:`.units`), shared out deterministically, and each rank lists its units into
items; worker processes decode, preprocess and patchify them (:mod:`.loading`, :mod:`.video`,
:mod:`.processing`); the token-budget packer groups items into forwards of at most ``max_tokens`` patches
(:mod:`.batching`); each group is one forward of the packing model (:mod:`.forward`, :mod:`.model`); the
features go to safetensors shards and every input gets one index row (:mod:`.shards`, :mod:`.index`), in a
folder one run owns at a time (:mod:`.folder`, :mod:`.lock`). Under ``torchrun`` every rank writes its own
shards and rank 0 merges the index after a barrier (:mod:`.distributed`).
"""

from hevc_vit.encode.api import encode
from hevc_vit.encode.options import DEFAULT_OUT, EncodeOptions
from hevc_vit.encode.output.folder import DiskFullError
from hevc_vit.encode.output.index import INDEX_NAME, DamagedFolderError, read_index
from hevc_vit.encode.output.result import EncodeResult
from hevc_vit.encode.output.shards import MissingFeaturesError, iter_features, load_features
from hevc_vit.encode.readers.expand import expand_inputs, sample_inputs
from hevc_vit.processing.files import load_processor
from hevc_vit.processing.processors import FixedSizeProcessor, ImageProcessor, NativeResolutionProcessor

__all__ = [
    "DEFAULT_OUT",
    "INDEX_NAME",
    "DamagedFolderError",
    "DiskFullError",
    "EncodeOptions",
    "EncodeResult",
    "FixedSizeProcessor",
    "ImageProcessor",
    "MissingFeaturesError",
    "NativeResolutionProcessor",
    "encode",
    "expand_inputs",
    "iter_features",
    "load_features",
    "load_processor",
    "read_index",
    "sample_inputs",
]
