"""Shared by several test modules."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq  # noqa: E402

from hevc_vit.encode import read_index
from hevc_vit.processing.processors import NativeResolutionProcessor

PROC = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48, max_video_tokens=96)


FRAMES, CONTEXT = 4, 16


OPTIONS = dict(processor=PROC, frames=FRAMES, temporal_context=CONTEXT, workers=0, progress=False, log=lambda m: None)


def read_npy_parquet(out):
    """Embeddings and metadata rows, part by part in index order, with numpy and pyarrow alone."""
    vectors, meta = [], []
    for part in sorted(dict.fromkeys(row["shard"] for row in read_index(out) if row["status"] == "ok")):
        table = pq.read_table(out / part)
        embeddings = np.load(out / "embeddings" / (part.split("/")[-1].removesuffix(".parquet") + ".npy"))
        assert embeddings.shape[0] == table.num_rows
        vectors.append(embeddings)
        meta += table.to_pylist()
    return np.concatenate(vectors), meta
