"""``hevc-vit encode``: native-resolution features for files and folders of images and videos.

The Python API is :func:`encode` with :class:`EncodeOptions`; the command line (``hevc_vit.cli.encode``)
only parses and calls it. Reading the features back: :func:`read_index`, :func:`iter_features`,
:func:`load_features`.

:func:`encode` (:mod:`.api`) checks the options and hands the run to an engine: the local one
(:mod:`.engines.local`; several processes under ``torchrun``) or Ray (:mod:`.engines.ray`); both use the same
pipeline (:mod:`.engines.pipeline`). Per rank: rank 0 expands the inputs to work units (:mod:`.readers.expand`;
a file, a tar shard, a parquet row group: :mod:`.readers.units`), shared out deterministically, and each rank lists
its units into items; worker processes decode, preprocess and patchify them (:mod:`.decode.load`,
:mod:`.decode.workers`, :mod:`hevc_vit.media.video`, :mod:`hevc_vit.processing`); the token-budget packer groups
items into forwards of at most ``max_tokens`` patches (:mod:`.model.batching`); each group is one forward of the
packing model, which returns every item's row and features (:mod:`.model.forward`, :mod:`.model.loader`); the
features go to safetensors shards and every input gets one index row (:mod:`.output.shards`,
:mod:`.output.index`), in a folder one run owns at a time (:mod:`.output.folder`, :mod:`.output.lock`). Under
``torchrun`` every rank writes its own shards and rank 0 merges the index after a barrier
(:mod:`.engines.distributed`).
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
