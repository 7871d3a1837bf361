"""Shared by several test modules: small images, their sources in every form encode reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit.processing.processors import NativeResolutionProcessor
from tests.helpers import write_tar

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
fsspec = pytest.importorskip("fsspec", reason="fsspec (the 'data' extra) is not installed")

PROC = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48, max_video_tokens=96)


OPTIONS = dict(processor=PROC, frames=4, workers=0, progress=False, log=lambda m: None)


SIZES = [(56, 42), (70, 42), (56, 42), (30, 100), (64, 64)]  # (width, height): two of one size


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def source(kind: str, tmp_path: Path, loose: Path, blobs: list[bytes]):
    """The images of ``loose`` given as ``kind``: (inputs, extra encode options)."""
    names = [f"{i:06d}.jpg" for i in range(len(blobs))]
    if kind == "tar":  # two shards by a brace range; each sample has a caption member too
        for shard, part in enumerate((range(0, 3), range(3, 5))):
            members = [(m, d) for i in part for m, d in ((names[i], blobs[i]), (f"{i:06d}.txt", b"x"))]
            write_tar(tmp_path / f"data-{shard:06d}.tar", members)
        return [str(tmp_path / "data-{000000..000001}.tar")], {}
    if kind in ("parquet", "csv", "tsv", "jsonl"):
        import pyarrow.csv as pc
        import pyarrow.json  # noqa: F401
        import pyarrow.parquet as pq

        table = pa.table({"path": [str(loose / n) for n in names], "caption": CAPTIONS[: len(names)]})
        path = tmp_path / f"list.{kind}"
        if kind == "parquet":
            pq.write_table(table, path)
        elif kind == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
        else:
            pc.write_csv(table, path, pc.WriteOptions(delimiter="\t" if kind == "tsv" else ","))
        return [path], {"keep_columns": ("caption",)}
    if kind == "dataset":
        return saved_dataset(tmp_path, blobs), {"keep_columns": ("caption",)}
    if kind == "iterable-dataset":
        return saved_dataset(tmp_path, blobs).to_iterable_dataset(), {}
    if kind in ("memory", "memory-glob"):
        root = f"/hevc-vit-test-{tmp_path.name}"
        fs = fsspec.filesystem("memory")
        for name, data in zip(names, blobs):
            fs.pipe(f"{root}/{name}", data)
        return [f"memory:/{root}/" if kind == "memory" else f"memory:/{root}/*.jpg"], {}
    if kind == "memory-tar":  # shards behind a URL: listed through fsspec, members read by range
        source("tar", tmp_path, loose, blobs)
        root = f"/hevc-vit-test-{tmp_path.name}"
        for shard in ("data-000000.tar", "data-000001.tar"):
            fsspec.filesystem("memory").pipe(f"{root}/{shard}", (tmp_path / shard).read_bytes())
        return [f"memory:/{root}/data-{{000000..000001}}.tar"], {}
    images = [Image.open(loose / n).convert("RGB") for n in names]
    if kind == "pil":
        return images, {}
    if kind == "numpy":
        return [np.asarray(image) for image in images], {}
    if kind == "tensor":
        return [torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images], {}  # (C, H, W)
    raise AssertionError(kind)


CAPTIONS = ["a", "b", "c", "d", "e"]


def saved_dataset(tmp_path: Path, blobs: list[bytes], images=None):
    datasets = pytest.importorskip("datasets", reason="datasets (the 'data' extra) is not installed")
    images = [{"bytes": b, "path": None} for b in blobs] if images is None else images
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "caption": CAPTIONS[: len(images)]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    return datasets.load_from_disk(str(tmp_path / "saved"))
