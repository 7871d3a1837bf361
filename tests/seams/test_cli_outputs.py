"""Where the parts meet: option parsing (ranges at parse time, no abbreviations, a suggestion on a typo, kept columns
that clash with index fields), a run with nothing to encode, the progress bar's count, ``normalize`` and the
clip-retrieval layout read the way clip-retrieval's indexer (embedding_reader) reads it."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hevc_vit.bench import BenchSetup
from hevc_vit.cli import build_parser, main
from hevc_vit.encode import EncodeOptions, encode, read_index
from hevc_vit.encode.engines import pipeline
from hevc_vit.encode.options import parse_budget
from hevc_vit.encode.output.index import ENCODE_CONFIG_NAME
from tests.helpers import crash_on_forward, features_by_path, write_image

OPTIONS = dict(
    processor="native",
    min_image_tokens=4,
    max_image_tokens=48,
    workers=0,
    dtype="float32",
    progress=False,
    log=lambda m: None,
)
VIDEO = Path(__file__).resolve().parents[2] / "src" / "hevc_vit" / "assets" / "ball.mp4"
HUGE = str(10**12)

# every numeric option of encode (flag, values refused): negative, zero where invalid, absurdly large, not a number
ENCODE_NUMERIC = {
    "--min-image-tokens": ["-1", "0", HUGE, "2.5", "x"],
    "--max-image-tokens": ["-1", "0", HUGE, "2.5"],
    "--max-video-tokens": ["-1", "0", HUGE, "1e3"],
    "--max-tokens": ["-5", "0", HUGE, "2.5"],
    "--frames": ["-1", "0", HUGE, "2.5"],
    "--temporal-context": ["-1", "0", HUGE, "2.5"],
    "--codec-budget": ["-1", "0", "1.5", "nan", "inf", HUGE, "x"],
    "--workers": ["-1", HUGE, "2.5"],
    "--decode-cpus": ["-1", "0", HUGE, "2.5"],
    "--model-actors": ["-1", "0", HUGE, "2.5"],
    "--shard-size-mb": ["-1", "nan", "inf", "1e12", "x"],
    "--retries": ["-1", HUGE, "2.5"],
    "--timeout": ["-1", "0", "nan", "inf", "x"],
    "--decode-timeout": ["-1", "0", "nan", "inf", "x"],
    "--ray-timeout": ["-1", "0", "nan", "inf", "x"],
}
CODEC_NUMERIC = {
    "--patch-size": ["0", "-16", HUGE, "1.5"],
    "--frames": ["0", "-1", HUGE, "2.5"],
    "--ratio": ["0", "-0.1", "1.5", "nan", "inf"],
    "--tokens": ["0", "-1", HUGE, "2.5"],
    "--budget-frames": ["0", "-1", "nan", "1e9"],
    "--max-tokens-per-frame": ["0", "-1", HUGE, "2.5"],
    "--columns": ["0", "-3", HUGE, "1.5"],
    "--size": ["0x5", "-16x32", "224", "1000000x224", "axb"],
}
# every field a run writes in an index row or a metadata table itself (hevc_vit.encode.output.index.make_row, the
# loaders' info, the parquet metadata, clip-retrieval's image_path)
INDEX_FIELDS = ("path", "shard", "key", "shape", "grid_thw", "status", "error", "kind", "id", "size")
INDEX_FIELDS += ("exif_orientation", "frames", "total_frames", "temporal_positions", "codec", "image_path")
BENCH_NUMERIC = {"--repeat": ["0", "-1", HUGE, "1.5"], "--iters": ["0", "-1", HUGE, "1.5"], "--warmup": ["-1", HUGE]}


def _parse_exit(argv: list[str], capsys) -> str:
    """``hevc-vit ARGV`` must stop while parsing with status 2; returns stderr. Parsing only: where it does not
    stop (the code before these checks), nothing runs."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 1. numeric options: checked against their range at parse time, in every command and in EncodeOptions
# --------------------------------------------------------------------------------------------------


def test_every_numeric_encode_option_is_listed():
    numeric = {
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(EncodeOptions)
        if f.metadata["cli"] and f.metadata["parse"] in (int, float, parse_budget)
    }
    assert numeric == set(ENCODE_NUMERIC)


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in ENCODE_NUMERIC.items() for v in values])
def test_encode_numeric_option_out_of_range_exits_2_at_parse_time(flag, value, tmp_path, capsys):
    out = tmp_path / "out"
    err = _parse_exit(["encode", str(tmp_path), "--out", str(out), f"{flag}={value}"], capsys)
    assert f"argument {flag}" in err and repr(value) in err and "expected" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "name,value",
    [
        (name, value)
        for name in (
            "min_image_tokens",
            "max_image_tokens",
            "max_video_tokens",
            "max_tokens",
            "frames",
            "decode_cpus",
            "model_actors",
        )
        for value in (-1, 0, 10**12, 2.5, True, "4")
    ]
    + [(name, value) for name in ("workers", "retries") for value in (-1, 10**12, 2.5, True, "4")]
    + [("temporal_context", v) for v in (-1, 0, 10**12, 2.5)]
    + [("codec_budget", v) for v in (-1, 0, 0.0, 1.5, math.nan, math.inf, 10**12, True)]
    + [("shard_size_mb", v) for v in (-1, math.nan, math.inf, 1e12, True, "4")],
)
def test_encode_options_numeric_out_of_range_is_a_value_error(name, value):
    extra = {"engine": "ray"} if name in ("decode_cpus", "model_actors") else {}
    with pytest.raises(ValueError, match=f"^{name}={value!r}; expected"):
        EncodeOptions(**{name: value}, **extra)


def test_encode_options_min_above_max_image_tokens():
    with pytest.raises(ValueError, match="min_image_tokens=100 and max_image_tokens=10"):
        EncodeOptions(min_image_tokens=100, max_image_tokens=10)


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in CODEC_NUMERIC.items() for v in values])
def test_codec_preview_numeric_option_out_of_range_exits_2(flag, value, tmp_path, capsys):
    argv = ["codec-preview", str(VIDEO), "-o", str(tmp_path / "sheet.png"), f"{flag}={value}"]
    err = _parse_exit(argv, capsys)
    assert f"argument {flag}" in err and repr(value) in err
    assert not (tmp_path / "sheet.png").exists()


def test_codec_library_refuses_patch_size_and_columns():
    from hevc_vit.codec import CodecSparseConfig, render_preview, select_patches

    with pytest.raises(ValueError, match="patch_size=0; expected a positive integer"):
        select_patches(VIDEO, 0)
    selection = select_patches(VIDEO, 16, CodecSparseConfig(frames=2, size=(32, 32)))
    with pytest.raises(ValueError, match="columns=0; expected a positive integer"):
        render_preview(VIDEO, selection, "unused.png", columns=0)


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in BENCH_NUMERIC.items() for v in values])
def test_bench_numeric_option_out_of_range_exits_2(flag, value, capsys):
    err = _parse_exit(["bench", f"{flag}={value}"], capsys)
    assert f"argument {flag}" in err and repr(value) in err


@pytest.mark.parametrize("name,value", [("repeat", 0), ("iters", 0), ("warmup", -1), ("iters", 2.5), ("repeat", 10**9)])
def test_bench_setup_refuses_counts(name, value):
    with pytest.raises(ValueError, match=f"{name}={value!r}; expected an integer from"):
        BenchSetup(**{name: value})


# --------------------------------------------------------------------------------------------------
# 2. kept columns named like an index field: refused up front
# --------------------------------------------------------------------------------------------------


def test_reserved_columns_are_the_index_fields():
    from hevc_vit.encode.output.formats import RESERVED_COLUMNS

    assert set(RESERVED_COLUMNS) == set(INDEX_FIELDS)


@pytest.mark.parametrize("column", INDEX_FIELDS)
def test_keep_columns_index_field_exits_2_before_anything(column, tmp_path, capsys):
    out = tmp_path / "out"
    err = _parse_exit(["encode", str(tmp_path), "--out", str(out), "--keep-columns", f"caption,{column}"], capsys)
    assert "--keep-columns" in err and f"found {column}" in err
    assert not out.exists()
    with pytest.raises(ValueError, match=f"keep_columns=.*found {column}"):
        EncodeOptions(keep_columns=[column])


def test_keep_columns_index_field_from_python_before_work(model, tmp_path):
    """A table with columns named like index fields: keeping them is refused before any work (it crashed after
    the work, or a kept ``size`` silently replaced the image's size); keeping ``caption`` works."""
    folder = tmp_path / "in"
    folder.mkdir()
    table = folder / "rows.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "status", "size", "kind"])
        for i in range(2):
            writer.writerow([str(write_image(folder / f"{i}.png", 40, 30, i)), f"c{i}", "x", "7", "k"])
    for column in ("status", "size", "kind", "key"):
        with pytest.raises(ValueError, match=f"found {column}"):
            encode([table], tmp_path / column, model=model, keep_columns=("caption", column), **OPTIONS)
        assert not (tmp_path / column).exists()
    result = encode([table], tmp_path / "ok", model=model, keep_columns="caption", **OPTIONS)
    assert result.encoded == 2 and [row["caption"] for row in read_index(tmp_path / "ok")] == ["c0", "c1"]


# --------------------------------------------------------------------------------------------------
# 3. nothing to encode: exit 2 before anything is created
# --------------------------------------------------------------------------------------------------


def _cli(inputs: list[str], out: Path, ckpt: Path, *extra: str) -> list[str]:
    common = ["--workers", "0", "--min-image-tokens", "4", "--max-image-tokens", "48", "-q"]
    return ["encode", *inputs, "--out", str(out), "--model", str(ckpt), *common, *extra]


def test_nothing_to_encode_exits_2_and_creates_nothing(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "missing": [str(tmp_path / "no-such.jpg")],
        "two missing": [str(tmp_path / "a.jpg"), str(tmp_path / "b")],
        "glob": [str(tmp_path / "*.nothing")],
        "empty folder": [str(empty)],
    }
    for name, inputs in cases.items():
        out = tmp_path / "deep" / "out"
        assert main(_cli(inputs, out, ckpt)) == 2, name
        err = capsys.readouterr().err
        assert "nothing to encode" in err and inputs[0] in err, name
        assert not (tmp_path / "deep").exists(), name  # nothing created, parents included
    good = write_image(tmp_path / "good.png", 40, 30, 0)
    assert main(_cli([str(good)], out, ckpt)) == 0  # the corrected rerun is not refused as "not empty"


def test_some_missing_inputs_are_a_normal_run(ckpt, tmp_path, capsys):
    """A missing path among good ones, or files that are found but cannot be decoded: a run with failed rows."""
    good = write_image(tmp_path / "good.png", 40, 30, 0)
    out = tmp_path / "out"
    assert main(_cli([str(good), str(tmp_path / "missing.png")], out, ckpt)) == 1
    rows = read_index(out)
    assert [row["status"] for row in rows] == ["ok", "failed"] and "no such file" in rows[1]["error"]
    capsys.readouterr()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.png").write_bytes(b"not an image")
    assert main(_cli([str(junk)], tmp_path / "junk-out", ckpt)) == 1
    summary = capsys.readouterr().out
    assert "nothing was encoded" in summary and "tokens/s" not in summary  # no throughput for no work


# --------------------------------------------------------------------------------------------------
# 4. no abbreviations; a suggestion on a typo
# --------------------------------------------------------------------------------------------------


def test_every_parser_refuses_abbreviations():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert parser.allow_abbrev is False
    assert sub.choices and all(p.allow_abbrev is False for p in sub.choices.values())


@pytest.mark.parametrize(
    "argv,suggested",
    [
        (["encode", "x", "--max-token", "5"], "--max-tokens"),
        (["encode", "x", "--max-token=5"], "--max-tokens"),
        (["encode", "x", "--pooled-onyl"], "--pooled-only"),
        (["encode", "x", "--normalise"], "--normalize"),
        (["bench", "--iter", "3"], "--iters"),
        (["bench", "--itres", "3"], "--iters"),
        (["codec-preview", "v.mp4", "-o", "x.png", "--column", "3"], "--columns"),
        (["convert", "a", "b", "--forse"], "--force"),
        (["info", "a", "--preest", "small"], "--preset"),
    ],
)
def test_typo_exits_2_with_the_closest_option(argv, suggested, capsys):
    err = _parse_exit(argv, capsys)
    assert "unrecognized arguments" in err and f"did you mean {suggested}?" in err


# --------------------------------------------------------------------------------------------------
# 5. the progress bar counts items as they finish
# --------------------------------------------------------------------------------------------------


def test_progress_counts_each_item_as_it_finishes(model, images, tmp_path, monkeypatch):
    calls, loaded = [], []
    add, item_loaded = pipeline.Tally.add, getattr(pipeline.Tally, "item_loaded", lambda self: None)

    def record_add(self, encoded, failed, tokens):
        calls.append((encoded, failed, tokens))
        add(self, encoded, failed, tokens)

    def record_loaded(self):
        loaded.append(1)
        item_loaded(self)

    monkeypatch.setattr(pipeline.Tally, "add", record_add)
    monkeypatch.setattr(pipeline.Tally, "item_loaded", record_loaded, raising=False)
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(images.iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "9-broken.png").write_bytes(b"broken")
    result = encode([folder, tmp_path / "missing.png"], tmp_path / "out", model=model, max_tokens=10**6, **OPTIONS)
    # all six images fit one forward: still one count per item, the failed ones included
    assert all(encoded + failed == 1 for encoded, failed, _ in calls)
    assert len(calls) == 8 and sum(c[1] for c in calls) == 2 == result.failed
    assert sum(c[2] for c in calls) == result.tokens and len(loaded) == 7  # the missing file is never loaded


# --------------------------------------------------------------------------------------------------
# 6. normalize
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["head", "mean"])
def test_normalize_pooled_is_raw_over_its_norm(model, images, tmp_path, pool):
    encode([images], tmp_path / "raw", model=model, pool=pool, **OPTIONS)
    encode([images], tmp_path / "unit", model=model, pool=pool, normalize=True, **OPTIONS)
    raw, unit = features_by_path(tmp_path / "raw"), features_by_path(tmp_path / "unit")
    assert raw.keys() == unit.keys() and len(raw) == 6
    for path in raw:
        r, u = raw[path]["pooled"].double(), unit[path]["pooled"].double()
        assert abs(r.norm().item() - 1) > 1e-2  # the raw vectors are not unit length: the test can fail
        torch.testing.assert_close(u.norm(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(u, r / r.norm(), atol=1e-6, rtol=1e-5)  # float32 forward, float32 storage
        assert torch.equal(raw[path]["patches"], unit[path]["patches"])  # patch features as computed


def test_normalize_is_recorded_and_checked_by_resume(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    encode([images / "0.png"], out, model=model, **OPTIONS)
    assert json.loads((out / ENCODE_CONFIG_NAME).read_text())["normalize"] is False
    with pytest.raises(ValueError, match="normalize: earlier False, now True"):
        encode([images], out, model=model, resume=True, normalize=True, **OPTIONS)
    config = json.loads((out / ENCODE_CONFIG_NAME).read_text())
    del config["normalize"]  # a folder written before the option existed: its vectors were not normalised
    (out / ENCODE_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="normalize: earlier False, now True"):
        encode([images], out, model=model, resume=True, normalize=True, **OPTIONS)
    assert encode([images], out, model=model, resume=True, **OPTIONS).skipped == 1
    with pytest.raises(ValueError, match="normalize with pool='none'"):
        EncodeOptions(normalize=True, pool="none")


# --------------------------------------------------------------------------------------------------
# 7. clip-retrieval layout
# --------------------------------------------------------------------------------------------------


def _captioned_table(folder: Path, n: int) -> Path:
    folder.mkdir()
    table = folder / "rows.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        for i in range(n):
            path = write_image(folder / f"{i}.png", 100 + 7 * i, 90 - 3 * i, i)  # about 48 patches each
            writer.writerow([str(path), f"caption {i}"])
    return table


def _read_like_clip_retrieval(out: Path) -> tuple[np.ndarray, list[dict]]:
    """The folder read as clip-retrieval's indexer reads it: embedding_reader's parquet_npy format over
    img_emb/ and metadata/ (every .npy and .parquet in sorted name order, zipped file by file)."""
    er = pytest.importorskip("embedding_reader", reason="embedding-reader is not installed")
    reader = er.EmbeddingReader(
        str(out / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "caption"],
    )
    vectors, rows = [], []
    for embeddings, meta in reader(batch_size=10**6, show_progress=False):
        vectors.append(embeddings)
        rows += meta[["image_path", "caption"]].to_dict("records")
    return np.concatenate(vectors), rows


def test_clip_retrieval_layout_reads_as_clip_retrieval_does(model, tmp_path):
    table = _captioned_table(tmp_path / "in", 7)
    common = dict(model=model, keep_columns="caption", max_tokens=48, shard_size_mb=0, **OPTIONS)
    encode([table], tmp_path / "raw", **common)
    encode([table], tmp_path / "clip", output_format="clip-retrieval", **common)
    out = tmp_path / "clip"
    npys, parts = sorted((out / "img_emb").iterdir()), sorted((out / "metadata").iterdir())
    assert len(npys) == len(parts) > 1  # several parts, paired by name
    assert [p.name.removeprefix("img_emb_").removesuffix(".npy") for p in npys] == [
        p.name.removeprefix("metadata_").removesuffix(".parquet") for p in parts
    ]
    vectors, rows = _read_like_clip_retrieval(out)
    raw = features_by_path(tmp_path / "raw")
    paths = [row["image_path"] for row in rows]  # in the order of the forwards, row i <-> vector i
    assert sorted(paths) == sorted(raw) and len(set(paths)) == 7  # one row per image
    assert all(row["caption"] == f"caption {Path(row['image_path']).stem}" for row in rows)
    assert np.load(npys[0]).dtype == np.float16  # as clip-retrieval stores them
    expected = np.stack([(r / r.norm()).numpy() for r in (raw[p]["pooled"].double() for p in paths)])
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float64), axis=1), 1.0, atol=2e-3)  # float16
    np.testing.assert_allclose(vectors.astype(np.float64), expected, atol=2e-3)


def test_clip_retrieval_layout_resumes_into_new_parts(model, tmp_path):
    table = _captioned_table(tmp_path / "in", 7)
    common = dict(model=model, keep_columns="caption", max_tokens=48, shard_size_mb=0, **OPTIONS)
    common.update(output_format="clip-retrieval", storage_dtype="float32")
    with crash_on_forward(model):
        encode([table], tmp_path / "run", **common)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "img_emb").iterdir()}
    assert before  # parts written before the crash
    resumed = encode([table], tmp_path / "run", resume=True, **common)
    assert 0 < resumed.skipped < 7 and resumed.encoded == 7 - resumed.skipped
    after = {p.name: p.read_bytes() for p in (tmp_path / "run" / "img_emb").iterdir()}
    assert all(after[name] == data for name, data in before.items())  # new parts, numbering continues
    encode([table], tmp_path / "whole", **common)
    got, got_rows = _read_like_clip_retrieval(tmp_path / "run")
    want, want_rows = _read_like_clip_retrieval(tmp_path / "whole")
    paths = [row["image_path"] for row in got_rows]
    assert len(paths) == len(set(paths)) == 7 and sorted(paths) == sorted(r["image_path"] for r in want_rows)
    order = {row["image_path"]: i for i, row in enumerate(want_rows)}
    want = want[[order[p] for p in paths]]  # no duplicates, nothing missing: compare image by image
    np.testing.assert_allclose(got, want, atol=1e-5)  # the same forwards: float32 rounding only
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="normalize|output_format"):
        encode([table], tmp_path / "run", resume=True, **{**common, "output_format": "npy-parquet"})
