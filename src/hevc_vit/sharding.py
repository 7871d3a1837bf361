"""Moved to :mod:`hevc_vit.encode`; ``from hevc_vit.sharding import ...`` keeps working for older code."""

from .encode import iter_features, load_features, read_index

__all__ = ["iter_features", "load_features", "read_index"]
