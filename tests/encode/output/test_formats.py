"""``--output-format npy-parquet|parquet`` and ``--storage-dtype``: read back with numpy and pyarrow only, against
the safetensors output of the same run; resume and overwrite keep working with parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hevc_vit.encode import encode, iter_features, read_index
from tests.helpers import assert_close_rel, crash_on_forward, features_by_path, without_shard
from tests.helpers.encode import read_npy_parquet
from tests.helpers.sources import OPTIONS, SIZES, jpeg, source

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
import pyarrow.parquet as pq  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list:
    """Tar samples and loose files, mixed: 5 + 2 images."""
    folder = tmp_path_factory.mktemp("mixed")
    loose = folder / "loose"
    loose.mkdir()
    blobs = [jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    for i, data in enumerate(blobs):
        (loose / f"{i:06d}.jpg").write_bytes(data)
    tar_inputs, _ = source("tar", folder, loose, blobs)
    return tar_inputs + [loose / "000000.jpg", loose / "000001.jpg"]


@pytest.fixture(scope="module")
def safetensors_run(model, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "out"
    encode(inputs, out, model=model, **OPTIONS)
    return features_by_path(out)


def test_npy_parquet_reads_back_with_numpy_and_pyarrow(model, inputs, safetensors_run, tmp_path):
    encode(inputs, tmp_path / "f16", model=model, output_format="npy-parquet", shard_size_mb=0.0005, **OPTIONS)
    embeddings, meta = read_npy_parquet(tmp_path / "f16")
    rows = read_index(tmp_path / "f16")
    assert embeddings.dtype == np.float16 and embeddings.shape == (7, 64)
    assert len({row["shard"] for row in rows}) > 1  # several parts
    assert [m["path"] for m in meta] == [row["path"] for row in rows]  # order, ids and metadata match the index
    assert [m["id"] for m in meta] == [f"{i:06d}" for i in range(5)] + [str(row["path"]) for row in rows[5:]]
    assert [m["grid_thw"] for m in meta] == [row["grid_thw"] for row in rows]
    assert [m["size"] for m in meta] == [row["size"] for row in rows]
    assert all(row["shape"] == [64] for row in rows)
    for vector, row in zip(embeddings, rows):  # float16 within 1e-3 relative of the float32 features
        want = safetensors_run[row["path"]]["pooled"]
        err = (torch.from_numpy(vector.astype(np.float32)) - want).abs().max() / want.abs().max()
        assert err <= 1e-3, (row["path"], float(err))

    encode(inputs, tmp_path / "f32", model=model, output_format="npy-parquet", storage_dtype="float32", **OPTIONS)
    embeddings32, _ = read_npy_parquet(tmp_path / "f32")
    assert embeddings32.dtype == np.float32
    for vector, row in zip(embeddings32, read_index(tmp_path / "f32")):
        assert torch.equal(torch.from_numpy(vector), safetensors_run[row["path"]]["pooled"])


def test_parquet_holds_patches_and_pooled_per_item(model, inputs, safetensors_run, tmp_path):
    encode(inputs, tmp_path / "out", model=model, output_format="parquet", **OPTIONS)
    rows = read_index(tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / rows[0]["shard"])
    assert table.column("path").to_pylist() == [row["path"] for row in rows]
    for item in table.to_pylist():
        want = safetensors_run[item["path"]]
        patches = np.array(item["patches"], dtype=np.float32)  # (N, D)
        assert patches.shape == (int(np.prod(item["grid_thw"])), 64)
        assert torch.equal(torch.from_numpy(patches), want["patches"])
        assert torch.equal(torch.from_numpy(np.array(item["pooled"], dtype=np.float32)), want["pooled"])
    with pytest.raises(ValueError, match="read it with pyarrow"):
        list(iter_features(tmp_path / "out"))


def test_storage_dtype_float16_in_safetensors(model, inputs, safetensors_run, tmp_path):
    encode(inputs, tmp_path / "out", model=model, storage_dtype="float16", **OPTIONS)
    for row, tensors in iter_features(tmp_path / "out"):
        assert tensors["patches"].dtype == torch.float16 and tensors["grid_thw"].dtype == torch.int64
        assert_close_rel(tensors["patches"], safetensors_run[row["path"]]["patches"], torch.float16, row["path"])


def test_bad_format_options_are_refused(model, inputs, tmp_path):
    with pytest.raises(ValueError, match="numpy and Arrow cannot hold bfloat16"):
        encode(inputs, tmp_path / "a", model=model, output_format="npy-parquet", storage_dtype="bfloat16", **OPTIONS)
    with pytest.raises(ValueError, match="pool='none'"):
        encode(inputs, tmp_path / "b", model=model, output_format="npy-parquet", pool="none", **OPTIONS)
    with pytest.raises(ValueError, match="output_format='csv'; expected one of"):
        encode(inputs, tmp_path / "c", model=model, output_format="csv", **OPTIONS)


@pytest.mark.parametrize("output_format", ["npy-parquet", "parquet"])
def test_resume_and_overwrite_with_parts(model, inputs, tmp_path, output_format):
    options = dict(model=model, max_tokens=24, shard_size_mb=0, output_format=output_format, **OPTIONS)
    options["storage_dtype"] = "float32"
    with crash_on_forward(model):
        encode(inputs, tmp_path / "run", **options)
    resumed = encode(inputs, tmp_path / "run", resume=True, **options)
    assert 0 < resumed.skipped < 7 and resumed.encoded == 7 - resumed.skipped
    whole = encode(inputs, tmp_path / "whole", **options)
    assert without_shard(read_index(tmp_path / "run")) == without_shard(read_index(tmp_path / "whole"))
    if output_format == "npy-parquet":
        (a, meta_a), (b, meta_b) = read_npy_parquet(tmp_path / "run"), read_npy_parquet(tmp_path / "whole")
        assert [m["path"] for m in meta_a] == [m["path"] for m in meta_b]
        assert_close_rel(torch.from_numpy(a), torch.from_numpy(b), what="pooled")  # float32 rounding of the head
    with pytest.raises(ValueError, match="output_format"):
        encode(inputs, tmp_path / "run", resume=True, **{**options, "output_format": "safetensors"})
    user_file = tmp_path / "whole" / "parts" / "notes.parquet"
    user_file.parent.mkdir(exist_ok=True)
    user_file.write_bytes(b"mine")
    assert encode(inputs, tmp_path / "whole", overwrite=True, **options).encoded == whole.encoded
    assert user_file.read_bytes() == b"mine"
