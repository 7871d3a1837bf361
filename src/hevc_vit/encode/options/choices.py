"""The choices of the output (formats, storage dtypes) and of reading (the URL timeout), and the names a run writes
in an index row: a leaf of the encode options, so that the options sit below the stages that use these choices
(:mod:`..output.formats`, :mod:`..readers.remote`) and those import them from here."""

from __future__ import annotations

OUTPUT_FORMATS = ("safetensors", "npy-parquet", "parquet", "clip-retrieval")
POOLED_FORMATS = ("npy-parquet", "clip-retrieval")  # one pooled vector per item in a .npy, its row in a .parquet
STORAGE_DTYPES = ("float16", "float32", "bfloat16")
INSTALL_HINT = "pip install 'hevc-vit[data]'"  # what the 'data' extra brings (URLs, tables, parquet)
DEFAULT_TIMEOUT = 30.0  # seconds a connection or a read of a URL may wait
DEFAULT_DECODE_TIMEOUT = 1800.0  # seconds a decoding worker may spend on one input (a stuck decoder, a FIFO)

ROW_FIELDS = ("path", "shard", "key", "shape", "grid_thw", "status", "error")
# every other field a run writes in a row: the item's kind, its source id, and what the loaders record
# (encode.loading, encode.sparse); a kept column may take none of these names
ITEM_FIELDS = ("kind", "id", "size", "exif_orientation", "frames", "total_frames", "temporal_positions", "codec")
# the columns of a metadata table (npy-parquet, clip-retrieval)
METADATA_COLUMNS = ("key", "id", "path", "kind", "grid_thw", "size", "shape")
# the names a run writes in an index row or a metadata table itself: a kept column may take none of them
RESERVED_COLUMNS = tuple(dict.fromkeys((*ROW_FIELDS, *ITEM_FIELDS, *METADATA_COLUMNS, "image_path")))


def check_storage_dtype(output_format: str, asked: str | None) -> None:
    """Refuse a storage dtype the format cannot hold."""
    if asked == "bfloat16" and output_format != "safetensors":
        raise ValueError(
            f"storage_dtype='bfloat16' with output_format={output_format!r}; numpy and Arrow cannot hold bfloat16: "
            f"expected float16 or float32 (or output_format='safetensors')"
        )
