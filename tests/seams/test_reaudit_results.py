"""Re-audit of issue 20's classes with new inputs: premultiplied alpha is laid over white like straight alpha,
float arrays outside [0, 1] are refused (never clipped to a white or black image that reads ``ok``), and kept
columns that Arrow cannot type or Parquet cannot store leave the run going, with every row readable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hevc_vit.encode import encode, read_index
from tests.helpers import features_by_path
from tests.helpers.encode import OPTIONS, PROC, read_npy_parquet


def _straight_alpha(seed: int, height: int = 42, width: int = 70) -> Image.Image:
    """A random RGBA image whose alpha runs from transparent to opaque (every level present)."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, height * width).reshape(height, width).round().astype(np.uint8)
    return Image.fromarray(rgba)


@pytest.mark.parametrize("mode", ["RGBa", "La"])
def test_premultiplied_alpha_is_laid_over_white_like_straight_alpha(mode):
    """A TIFF with associated alpha opens as ``RGBa``; PIL's ``convert("RGB")`` drops its alpha (transparent
    pixels black, half-transparent ones at full colour). Tolerance: premultiplying rounds ``c·a/255`` to an
    integer (0.5) and compositing rounds again (0.5): at most 1 per sample."""
    straight = _straight_alpha(0)
    if mode == "La":
        straight = straight.convert("LA")
    premultiplied = straight.convert(mode)
    want, grid = PROC.patchify(straight, 14, normalize=False)  # (N, C·p·p) uint8
    got, got_grid = PROC.patchify(premultiplied, 14, normalize=False)
    assert got_grid == grid
    assert (got.int() - want.int()).abs().max().item() <= 1


def test_float_arrays_outside_0_1_get_failed_rows_not_clipped_images(model, tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(42, 70, 3), dtype=np.uint8)
    inputs = [
        pixels.astype(np.float32),  # 0..255 as floats: clipped, all but black pixels became white
        (pixels.astype(np.float32) / 255 - 0.5) / 0.5,  # normalised to [-1, 1]: clipped, half of it black
        torch.from_numpy(pixels.astype(np.float64) / 255).permute(2, 0, 1),  # in range: encoded
        pixels,
    ]
    encode(inputs, tmp_path / "out", model=model, **OPTIONS)
    rows = {row["path"]: row for row in read_index(tmp_path / "out")}
    assert [rows[f"object[{i}]"]["status"] for i in range(4)] == ["failed", "failed", "ok", "ok"]
    assert "values in [0, 255]; expected [0, 1]" in rows["object[0]"]["error"]
    assert "values in [-1, 1]; expected [0, 1]" in rows["object[1]"]["error"]
    features = features_by_path(tmp_path / "out")
    assert torch.equal(features["object[2]"]["pooled"], features["object[3]"]["pooled"])  # exact: same uint8


def _strict_rows(out) -> list[dict]:
    def refuse(constant: str):
        raise ValueError(f"index.jsonl holds {constant}, which strict JSON has not")

    return [json.loads(line, parse_constant=refuse) for line in (out / "index.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("output_format", ["npy-parquet", "clip-retrieval", "parquet"])
def test_kept_columns_parquet_cannot_store_keep_the_run(model, tmp_path, output_format):
    """An unsigned 64-bit id past int64 (Arrow's inference overflowed) and a column of empty mappings (a struct
    without fields, which Parquet refuses) crashed the whole run at the first part; such a column now holds each
    value's JSON text, the other columns their Arrow types."""
    paths = []
    for i, (w, h) in enumerate([(70, 42), (56, 56), (41, 97), (30, 30)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    table = pa.table(
        {
            "path": paths[:2],
            "uid": pa.array([2**64 - 1, None], pa.uint64()),
            "tags": pa.array([["a"], []], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    lines = [json.dumps({"path": p, "extra": {}}) for p in paths[2:]]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    opts = dict(OPTIONS, model=model, output_format=output_format)
    encode([str(tmp_path / "t.parquet")], out, keep_columns=["uid", "tags"], **opts)
    encode([str(tmp_path / "t.jsonl")], out, keep_columns=["extra"], resume=True, **opts)
    rows = _strict_rows(out)
    assert [row["status"] for row in rows] == ["ok"] * 4
    meta = pd.concat([pd.read_parquet(out / part) for part in dict.fromkeys(row["shard"] for row in rows)])
    by_key = {record["key"]: record for record in meta.to_dict("records")}
    assert sorted(by_key) == sorted(row["key"] for row in rows)
    for row in rows:
        record = by_key[row["key"]]
        if "uid" in row:  # JSON text: Arrow has no integer type for both rows
            assert (None if record["uid"] is None else json.loads(record["uid"])) == row["uid"]
            assert list(record["tags"]) == row["tags"]  # a column Arrow types keeps its type
        else:
            assert json.loads(record["extra"]) == row["extra"] == {}
    if output_format == "npy-parquet":
        vectors, meta_rows = read_npy_parquet(out)
        assert vectors.shape[0] == len(meta_rows) == 4


@pytest.mark.parametrize("output_format", ["npy-parquet", "clip-retrieval"])
def test_a_kept_column_empty_in_one_part_still_reads_as_one_folder(model, tmp_path, output_format):
    """Captions missing from the first table's rows made that part's column Arrow's null type; a folder of parts
    (``pd.read_parquet(folder)``, pyarrow's dataset: the first part's schema) then failed to read the later part's
    strings ("Unsupported cast from string to null")."""
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (42, 56, 3), dtype=np.uint8)).save(paths[-1])
    no_captions = pa.array([None, None], pa.string())
    pq.write_table(pa.table({"path": paths[:2], "caption": no_captions}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"path": paths[2:], "caption": ["x", "y"]}), tmp_path / "b.parquet")
    out = tmp_path / "out"
    opts = dict(OPTIONS, model=model, output_format=output_format, keep_columns=["caption"])
    encode([str(tmp_path / "a.parquet")], out, **opts)
    encode([str(tmp_path / "b.parquet")], out, resume=True, **opts)
    rows = _strict_rows(out)
    folder = pd.read_parquet(out / "metadata")
    assert sorted(folder["key"]) == sorted(row["key"] for row in rows)
    want = {row["key"]: row.get("caption") for row in rows}
    assert {key: caption for key, caption in zip(folder["key"], folder["caption"])} == want
