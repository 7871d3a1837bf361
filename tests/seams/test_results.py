"""Where the parts meet (issue 20, group a): video frames keep their aspect ratio at every clip budget (fewer
frames rather than strips), float and 32-bit TIFFs are scaled or refused (never silently black), and
``index.jsonl`` stays strict JSON whatever the kept columns hold."""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hevc_vit.encode import encode, read_index
from hevc_vit.encode.output.index import INDEX_NAME
from hevc_vit.media.video import sample_frame_indices, temporal_positions
from hevc_vit.processing.processors import NativeResolutionProcessor
from tests.helpers import assert_close_rel, assert_same_output, features_by_path

P = 14
OPTIONS = dict(workers=0, progress=False, log=lambda message: None, device="cpu")


def _aspect_kept(h: int, w: int, H: int, W: int, p: int = P) -> bool:
    """Some one scale ``s`` puts both sides within one patch of the source's: ``|h - s·H/p| < 1``,
    ``|w - s·W/p| < 1`` (a side under one patch at ``s`` rounds up to one patch)."""
    h0, w0 = H / p, W / p
    low = max((h - 1) / h0, (w - 1) / w0, 0.0)
    high = min((h + 1) / h0, (w + 1) / w0)
    return low < high


def _some_kept_grid_between(H: int, W: int, lo: int, hi: int) -> bool:
    """Brute force: is there any grid with ``lo <= h·w <= hi`` that keeps the aspect ratio?"""
    return any(_aspect_kept(h, w, H, W) for h in range(1, hi + 1) for w in range(max(1, -(-lo // h)), hi // h + 1))


SIZES = [(320, 240), (240, 320), (1000, 20), (20, 1000), (10000, 14), (14, 10000), (1, 1), (7, 3), (3, 7)]
SIZES += [(1920, 1080), (33, 400), (3000, 14), (100000, 14), (14, 100000), (299, 301), (2, 5000)]


def _check_grid(H: int, W: int, grid: tuple[int, int], lo: int, hi: int) -> None:
    h, w = grid
    assert h >= 1 and w >= 1, (W, H, grid)
    assert h * w <= hi, f"{W}x{H} -> {grid}: {h * w} patches > max {hi}"
    assert _aspect_kept(h, w, H, W), f"{W}x{H} -> {w}x{h} patches: aspect ratio off by more than one patch"
    if h * w < lo:  # only where no grid that keeps the aspect ratio lies between the bounds
        assert not _some_kept_grid_between(H, W, lo, hi), f"{W}x{H} -> {grid}: {h * w} < min {lo}, avoidably"


@pytest.mark.parametrize("bounds", [(256, 4096), (256, 256), (64, 70), (4, 4), (1, 10_000), (100, 101), (9, 9)])
def test_native_grid_keeps_the_aspect_ratio_at_any_bounds(bounds):
    lo, hi = bounds
    proc = NativeResolutionProcessor(patch_size=P, min_tokens=lo, max_tokens=hi)
    for W, H in SIZES:
        _check_grid(H, W, proc.grid_size(H, W), lo, hi)


@pytest.mark.parametrize(
    "min_tokens, max_video_tokens", [(256, 8192), (4, 256), (16, 1000), (1, 50), (64, 64), (300, 200), (256, 1000)]
)
def test_video_frames_keep_the_aspect_ratio_within_the_clip_budget(min_tokens, max_video_tokens):
    proc = NativeResolutionProcessor(patch_size=P, min_tokens=min_tokens, max_video_tokens=max_video_tokens)
    fit = max_video_tokens // min_tokens
    for frames in (1, 2, 3, 8, 31, 32, 33, 48, 64, 500, 5000):  # a list of one frame is a clip too
        if frames > fit:
            with pytest.raises(ValueError, match=f"a clip of {frames} frames .*expected at most {fit} frames"):
                proc.grid_size(240, 320, num_frames=frames)
        else:
            lo, hi = proc.token_bounds(frames)
            assert lo == min_tokens and frames * hi <= max_video_tokens
            for W, H in SIZES:
                _check_grid(H, W, proc.grid_size(H, W, num_frames=frames), lo, hi)
        assert proc.frames_that_fit(frames) == min(frames, fit)


def test_the_reported_clip_is_no_longer_a_strip():
    """320x240 at the defaults: 32 frames (8192 / 32 = 256 per frame) were 1x256-patch strips; 48 frames
    (170 per frame, under the minimum) are refused by the processor and sampled as 32 by encode."""
    proc = NativeResolutionProcessor()
    frames = [Image.new("RGB", (320, 240), (10 * i, 0, 0)) for i in range(32)]
    patches, (t, h, w) = proc.patchify(frames, P)
    assert t == 32 and _aspect_kept(h, w, 240, 320) and 32 * h * w <= 8192 and patches.shape[0] == 32 * h * w
    with pytest.raises(ValueError, match="48 frames .* max_video_tokens=8192; expected at most 32 frames"):
        proc(frames + frames[:16])


# --------------------------------------------------------------------------------------------------
# videos through encode: fewer frames sampled uniformly, the same as asking for that many
# --------------------------------------------------------------------------------------------------


def _write_clip(path: Path, frames: int, width: int, height: int) -> Path:
    av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for i in range(frames):
            frame = np.roll(base, 3 * i, axis=1)  # a pan: every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.video
def test_encode_samples_as_many_frames_as_the_clip_budget_holds(model, tmp_path, one_thread):
    clip = _write_clip(tmp_path / "clip.mp4", 12, 112, 84)
    proc = NativeResolutionProcessor(patch_size=P, min_tokens=16, max_tokens=64, max_video_tokens=64)  # 4 frames
    notes: list[str] = []
    options = {**OPTIONS, "model": model, "processor": proc, "temporal_context": 16}
    encode([clip], tmp_path / "asked10", frames=10, **{**options, "log": notes.append})
    encode([clip], tmp_path / "asked4", frames=4, **options)
    assert_same_output(tmp_path / "asked10", tmp_path / "asked4")
    assert any("sampled at 4 frames" in n for n in notes), notes
    (row,) = read_index(tmp_path / "asked10")
    t, h, w = row["grid_thw"]
    assert row["status"] == "ok" and t == 4 and _aspect_kept(h, w, 84, 112) and 4 * h * w <= 64
    assert row["frames"] == sample_frame_indices(12, 4)
    assert row["temporal_positions"] == temporal_positions(4, 16)

    none_fit = NativeResolutionProcessor(patch_size=P, min_tokens=16, max_tokens=64, max_video_tokens=15)
    encode([clip], tmp_path / "none", frames=10, **{**options, "processor": none_fit})
    (row,) = read_index(tmp_path / "none")
    assert row["status"] == "failed" and "more than max_video_tokens=15" in row["error"], row


@pytest.mark.video
def test_codec_sparse_frames_keep_the_aspect_ratio(model, tmp_path, one_thread):
    clip = _write_clip(tmp_path / "clip.mp4", 16, 112, 84)
    # a patch-count budget sizes frames as 16 frames: 160 // 16 = 10 patches each, under the minimum of 16
    proc = NativeResolutionProcessor(patch_size=P, min_tokens=16, max_tokens=64, max_video_tokens=160)
    codec = dict(codec_sparse=True, frames=16, codec_budget=40)
    encode([clip], tmp_path / "out", processor=proc, model=model, **codec, **OPTIONS)
    (row,) = read_index(tmp_path / "out")
    t, h, w = row["grid_thw"]
    assert row["status"] == "ok", row["error"]
    assert t == 16 and _aspect_kept(h, w, 84, 112) and h * w >= 16, row["grid_thw"]
    assert row["codec"]["tokens"] == 40 and row["codec"]["dense_tokens"] == 16 * h * w


@pytest.mark.video
def test_codec_frame_cap_keeps_the_aspect_ratio_and_the_cap(tmp_path):
    from hevc_vit.codec import CodecSparseConfig
    from hevc_vit.codec.decode import probe

    for W, H in ((448, 28), (28, 448), (320, 240), (224, 224), (1008, 42)):
        clip = _write_clip(tmp_path / f"{W}x{H}.mp4", 2, W, H)
        for cap in (1, 3, 10, 50, 200):
            _, _, (out_h, out_w) = probe(clip, P, CodecSparseConfig(max_tokens_per_frame=cap))
            h, w = out_h // P, out_w // P
            assert h * w <= cap and h >= 1 and w >= 1, (W, H, cap, (h, w))
            assert _aspect_kept(h, w, H, W), (W, H, cap, (h, w))


def test_tower_image_processor_keeps_the_aspect_ratio_at_tight_bounds():
    from hevc_vit.processing.image_processing import HEVCViTImageProcessor

    for lo, hi in ((256, 4096), (256, 256), (64, 70)):
        processor = HEVCViTImageProcessor(min_tokens=lo, max_tokens=hi)
        for W, H in ((10000, 14), (14, 10000), (320, 240), (100000, 14), (1000, 20), (3, 7)):
            (grid,) = processor(np.zeros((H, W, 3), np.uint8))["image_grid_thw"].tolist()
            _check_grid(H, W, (grid[1], grid[2]), lo, hi)


# --------------------------------------------------------------------------------------------------
# float and 32-bit TIFFs
# --------------------------------------------------------------------------------------------------


def _tiffs(root: Path) -> dict[str, str]:
    """The same 8-bit grey image as PNG and as TIFFs of other sample types (name -> what it must give)."""
    gray = np.random.default_rng(3).integers(0, 256, (42, 70), dtype=np.uint8)
    gray[0, 0], gray[-1, -1] = 0, 255  # the full range
    Image.fromarray(gray).save(root / "gray8.png")
    same = {
        "f01.tiff": gray.astype(np.float32) / 255,  # mode F in [0, 1]
        "i16.tiff": gray.astype(np.uint16) * 257,  # I;16
        "i16b.tiff": (gray.astype(np.uint16) * 257).astype(">u2"),  # I;16B
        "i32.tiff": gray.astype(np.int32) * 257,  # mode I, 16-bit values
    }
    bad = {
        "f255.tiff": (gray.astype(np.float32), r"\[0, 255\]; expected \[0, 1\]"),  # floats holding 0..255
        "f65535.tiff": (gray.astype(np.float32) * 257, r"\[0, 65535\]; expected \[0, 1\]"),
        "fneg.tiff": (gray.astype(np.float32) / 255 - 0.5, r"\[-0.5, 0.5\]; expected \[0, 1\]"),
        "fnan.tiff": (np.where(gray > 128, np.nan, gray / 255).astype(np.float32), "NaN or infinite"),
        "finf.tiff": (np.where(gray > 250, np.inf, gray / 255).astype(np.float32), "NaN or infinite"),
        "i32big.tiff": (gray.astype(np.int32) * 65793, r"\[0, 16777215\]; expected \[0, 65535\]"),
        "i32neg.tiff": (gray.astype(np.int32) - 128, r"\[-128, 127\]; expected \[0, 65535\]"),
    }
    for name, array in {**same, **{n: a for n, (a, _) in bad.items()}}.items():
        Image.fromarray(array).save(root / name)
        assert Image.open(root / name).mode in ("F", "I", "I;16", "I;16B"), name
    return {**{n: "same" for n in same}, **{n: m for n, (_, m) in bad.items()}}


def test_float_and_wide_integer_tiffs_are_scaled_like_8_bit_or_fail_naming_the_range(model, tmp_path, one_thread):
    root = tmp_path / "in"
    root.mkdir()
    expect = _tiffs(root)
    proc = NativeResolutionProcessor(patch_size=P, min_tokens=4, max_tokens=48)
    encode([root], tmp_path / "out", processor=proc, model=model, **OPTIONS)
    rows = {Path(r["path"]).name: r for r in read_index(tmp_path / "out")}
    features = {Path(k).name: v for k, v in features_by_path(tmp_path / "out").items()}
    reference = features["gray8.png"]
    for name, want in expect.items():
        row = rows[name]
        if want == "same":
            assert row["status"] == "ok", (name, row["error"])
            assert row["grid_thw"] == rows["gray8.png"]["grid_thw"]
            for part in ("patches", "pooled"):
                assert_close_rel(features[name][part], reference[part], what=f"{name} {part}")
        else:
            assert row["status"] == "failed", (name, row)
            assert re.search(want, row["error"]), (name, row["error"])


# --------------------------------------------------------------------------------------------------
# index.jsonl: strict JSON
# --------------------------------------------------------------------------------------------------


def _strict_rows(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_json_value_gives_strict_json_for_what_columns_hold():
    from hevc_vit.encode.output.index import json_value, row_json

    values = {
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": -math.inf,
        "np_nan": np.float32("nan"),
        "np_int": np.int64(7),
        "np_float": np.float16(0.5),
        "np_bool": np.bool_(True),
        "array": np.array([1.0, np.nan]),
        "nested": {1: [float("nan"), (2, np.int8(3))], "s": {4}},
        "bytes": b"abc",
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9),
        "day": datetime.date(2024, 5, 6),
        "price": decimal.Decimal("1.10"),
        "gap": datetime.timedelta(seconds=3),
    }
    row = json.loads(row_json(values), parse_constant=lambda token: pytest.fail(f"{token} written"))
    assert row["nan"] is None and row["inf"] is None and row["ninf"] is None and row["np_nan"] is None
    assert row["np_int"] == 7 and row["np_float"] == 0.5 and row["np_bool"] is True
    assert row["array"] == [1.0, None] and row["nested"] == {"1": [None, [2, 3]], "s": [4]}
    assert row["bytes"] == "<3 bytes>" and row["when"] == "2024-05-06T07:08:09"
    assert row["day"] == "2024-05-06" and row["price"] == "1.10" and row["gap"] == "0:00:03"
    assert json_value(values["np_int"]).__class__ is int


def test_kept_columns_of_a_parquet_table_and_a_dataset_stay_strict_json(model, tmp_path, one_thread):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "img"
    root.mkdir()
    paths = []
    for i in range(4):
        Image.fromarray(np.full((28, 42, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    table = pa.table(
        {
            "path": paths,
            "score": [1.5, float("nan"), float("inf"), -float("inf")],
            "when": pa.array([datetime.datetime(2024, 1, i + 1) for i in range(4)], pa.timestamp("us")),
            "blob": [b"x", b"yy", None, b""],
            "price": pa.array([decimal.Decimal("1.25")] * 4, pa.decimal128(5, 2)),
            "vec": [[0.5, float("nan")]] * 4,
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    keep = ("score", "when", "blob", "price", "vec")
    encode([tmp_path / "t.parquet"], tmp_path / "out", keep_columns=keep, model=model, **OPTIONS)
    rows = _strict_rows(tmp_path / "out" / INDEX_NAME)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert [r["score"] for r in rows] == [1.5, None, None, None]
    assert rows[0]["when"] == "2024-01-01T00:00:00" and rows[1]["blob"] == "<2 bytes>" and rows[2]["blob"] is None
    assert rows[0]["price"] == "1.25" and rows[0]["vec"] == [0.5, None]

    datasets = pytest.importorskip("datasets", reason="datasets (the 'data' extra) is not installed")
    images = [{"bytes": Path(p).read_bytes(), "path": None} for p in paths]
    features = datasets.Features({"image": datasets.Image(), "score": datasets.Value("float32")})
    ds = datasets.Dataset.from_dict({"image": images, "score": [0.25, float("nan"), float("inf"), 2.0]}, features)
    encode([ds], tmp_path / "ds", keep_columns=("score",), model=model, **OPTIONS)
    rows = _strict_rows(tmp_path / "ds" / INDEX_NAME)
    assert [r["score"] for r in rows] == [0.25, None, None, 2.0]
