"""``hevc-vit codec-assets`` takes its inputs as ``encode`` does (:mod:`hevc_vit.cli.codec_sources`): a clip in a
tar shard, in a parquet table (key and path columns), behind an http URL (a loopback server of this test) and
matched by a glob gives the assets of the same clip given as a local path, byte for byte."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import threading

import numpy as np
import pytest

from hevc_vit.cli import main
from hevc_vit.cli.codec_sources import expand_codec_inputs
from hevc_vit.codec.assets import read_index
from tests.helpers import write_tar
from tests.helpers.codec_clips import write_moving_clip

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video  # PyAV encodes and decodes the clips

ARGS = ["--frames", "8", "--num-images", "2", "--square-size", "64", "--patch-size", "16", "-q"]
FILES = ("positions_thw.npy", "visible_indices.npy", "frame_ids.npy", "mosaic_000.jpg", "mosaic_001.jpg")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for name, seed in (("clip", 0), ("other", 1)):
        write_moving_clip(folder / f"{name}.mp4", frames=10, size=64, seed=seed)
    (folder / "still.png").write_bytes(b"not a video: a folder's or a glob's images are not codec inputs")
    return folder


@contextlib.contextmanager
def serving(folder):
    """An http server on the loopback address serving ``folder``: its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.func.log_message = lambda *args: None  # quiet
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(clips):
    """An http server on the loopback address serving ``clips``, stopped after the module."""
    with serving(clips) as url:
        yield url


@pytest.fixture(scope="module")
def local(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    assert main(["codec-assets", str(clips / "clip.mp4"), str(clips / "other.mp4"), "--out", str(out), *ARGS]) == 0
    return out


def assert_same_assets(out, key: str, local, local_key: str) -> None:
    for name in FILES:
        got = (out / "assets" / key / name).read_bytes()
        assert got == (local / "assets" / local_key / name).read_bytes(), f"{key}/{name} differs from the local run"


def test_a_tar_member_gives_the_assets_of_the_local_clip(clips, local, tmp_path):
    shard = write_tar(
        tmp_path / "shard.tar",
        [("clip.mp4", (clips / "clip.mp4").read_bytes()), ("clip.txt", b"a caption"), ("pic.png", b"x")],
    )
    out = tmp_path / "out"
    assert main(["codec-assets", str(shard), "--out", str(out), *ARGS]) == 0
    (row,) = read_index(out)  # the image member is not a codec input
    assert row["status"] == "ok" and row["key"] == "clip" and row["video"].startswith("tar://clip.mp4::")
    assert_same_assets(out, "clip", local, "clip")
    meta = json.loads((out / "assets" / "clip" / "meta.json").read_text())
    assert meta["video"] == row["video"]  # the input's name, not the temporary copy's
    workers = tmp_path / "workers"  # the job's fetch travels to worker processes
    second = write_tar(tmp_path / "second.tar", [("clip.mp4", (clips / "other.mp4").read_bytes())])
    assert main(["codec-assets", str(shard), str(second), "--out", str(workers), "--workers", "2", *ARGS]) == 0
    assert [r["key"] for r in read_index(workers)] == ["clip", "clip-2"]  # one stem twice: made unique
    assert_same_assets(workers, "clip", local, "clip")
    assert_same_assets(workers, "clip-2", local, "other")


def test_a_parquet_table_with_key_and_path_columns(clips, local, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="tables need pyarrow (the 'data' extra)")
    import pyarrow.parquet as pq  # optional: skipped above without it

    table = pa.table(
        {
            "name": ["one", "two", "gone"],
            "file": [str(clips / "clip.mp4"), str(clips / "other.mp4"), str(clips / "missing.mp4")],
            "exists": [True, True, False],
            "caption": ["a", "b", "c"],
        }
    )
    pq.write_table(table, tmp_path / "table.parquet")
    out = tmp_path / "out"
    args = ["codec-assets", str(tmp_path / "table.parquet"), "--key-column", "name", "--path-column", "file"]
    assert main([*args, "--out", str(out), *ARGS]) == 0
    assert [(r["key"], r["status"]) for r in read_index(out)] == [("one", "ok"), ("two", "ok")]  # exists: false
    assert_same_assets(out, "one", local, "clip")
    assert_same_assets(out, "two", local, "other")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["name"], r["caption"], len(r["images"])) for r in records] == [("one", "a", 2), ("two", "b", 2)]
    with pytest.raises(ValueError, match="path_column='video' is not a column"):
        expand_codec_inputs([str(tmp_path / "table.parquet")])


def test_an_http_url_gives_the_assets_of_the_local_clip(server, local, tmp_path):
    out = tmp_path / "out"
    args = ["codec-assets", f"{server}/clip.mp4", f"{server}/missing.mp4", "--out", str(out), *ARGS]
    assert main(args) == 1  # the missing file is a failed row
    ok, missing = read_index(out)
    assert ok["status"] == "ok" and ok["key"] == "clip" and ok["video"] == f"{server}/clip.mp4"
    assert missing["status"] == "failed" and missing["error"] == f"FileNotFoundError: {server}/missing.mp4"
    assert_same_assets(out, "clip", local, "clip")
    assert main([*args, "--resume"]) == 1  # the URL's key is the same again: its folder is done
    assert [(r["key"], r["status"], r.get("resumed", False)) for r in read_index(out)] == [
        ("clip", "ok", True),
        ("missing", "failed", False),
    ]


def test_a_glob_and_a_folder_give_the_assets_of_the_local_clips(clips, local, tmp_path):
    out = tmp_path / "glob"
    assert main(["codec-assets", str(clips / "*"), "--out", str(out), *ARGS]) == 0  # the .png is left out
    assert [r["key"] for r in read_index(out)] == ["clip", "other"]
    assert_same_assets(out, "clip", local, "clip")
    assert_same_assets(out, "other", local, "other")
    missing = str(clips / "nothing-*.mp4")
    jobs = expand_codec_inputs([str(clips), str(clips / "clip.mp4"), missing])  # the named clip is listed once
    assert [(j.name, j.video, bool(j.error)) for j in jobs] == [
        ("clip.mp4", str(clips / "clip.mp4"), False),
        ("other.mp4", str(clips / "other.mp4"), False),
        ("", missing, True),
    ]


def test_a_key_from_a_table_never_writes_outside_the_output_folder(clips, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="tables need pyarrow (the 'data' extra)")
    import pyarrow.csv as pc  # optional: skipped above without it

    table = pa.table({"key": ["../escape", "a/b", "fine", "fine"], "video": [str(clips / "clip.mp4")] * 4})
    pc.write_csv(table, tmp_path / "jobs.csv")
    out = tmp_path / "out"
    assert main(["codec-assets", str(tmp_path / "jobs.csv"), "--out", str(out), *ARGS]) == 1
    rows = read_index(out)
    keys = [("../escape", "failed"), ("a/b", "failed"), ("fine", "ok"), ("fine", "failed")]  # the last: a repeat
    assert [(r["key"], r["status"]) for r in rows] == keys
    assert not (tmp_path / "escape").exists() and sorted(p.name for p in (out / "assets").iterdir()) == ["fine"]
    assert np.load(out / "assets" / "fine" / "positions_thw.npy").shape == (2 * 16, 3)


def test_a_jsonl_behind_a_url_or_a_glob_is_a_table_and_skips_rows_that_do_not_exist(clips, local, tmp_path):
    """A ``.jsonl`` named directly is the reference's job list; behind a URL or matched by a glob it is read as
    a table (encode's reader: a relative path is taken from the table's folder), with the same rule for a
    false ``exists`` and every field kept for the manifest."""
    pytest.importorskip("pyarrow", reason="tables need pyarrow (the 'data' extra)")
    served = tmp_path / "served"
    served.mkdir()
    for name in ("clip.mp4", "other.mp4"):
        (served / name).write_bytes((clips / name).read_bytes())
    lines = [
        {"video": "clip.mp4", "key": "first", "exists": True, "caption": "a"},
        {"video": "other.mp4", "key": "skipped", "exists": False, "caption": "b"},
        {"video": "other.mp4", "key": "second", "exists": True, "caption": "c"},
    ]
    (served / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    lists = tmp_path / "lists"
    lists.mkdir()
    relative = [{**line, "video": os.path.relpath(clips / line["video"], lists)} for line in lines]  # ../clips..
    (lists / "jobs-1.jsonl").write_text("".join(json.dumps(line) + "\n" for line in relative))
    with serving(served) as url:
        for given in (f"{url}/jobs.jsonl", str(lists / "jobs-*.jsonl")):
            out = tmp_path / ("url" if given.startswith("http") else "glob")
            assert main(["codec-assets", given, "--out", str(out), *ARGS]) == 0
            rows = read_index(out)
            assert [(r["key"], r["status"]) for r in rows] == [("first", "ok"), ("second", "ok")], given
            expected = f"{url}/clip.mp4" if given.startswith("http") else os.path.join(lists, relative[0]["video"])
            assert rows[0]["video"] == expected  # a relative path is taken from the table's folder
            assert_same_assets(out, "first", local, "clip")
            assert_same_assets(out, "second", local, "other")
            records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
            assert [(r["key"], r["caption"], r["exists"]) for r in records] == [
                ("first", "a", True),
                ("second", "c", True),
            ]


def test_hugging_face_datasets_on_disk_and_in_memory(clips, local, tmp_path):
    """``--hf-dataset`` (a dataset saved to disk: video bytes, a path and a ``datasets.Video`` column) and an
    in-memory ``datasets.Dataset`` given to :func:`expand_codec_inputs` (run in worker processes: the jobs carry
    what they need) give the local clips' assets; ``exists: false`` rows are skipped, other columns kept."""
    datasets = pytest.importorskip("datasets", reason="datasets (the 'data' extra) is not installed")
    from hevc_vit.codec import write_assets
    from hevc_vit.codec.assets import AssetSettings

    clip, other = (clips / "clip.mp4").read_bytes(), (clips / "other.mp4").read_bytes()
    features = datasets.Features(
        {"video": datasets.Value("binary"), "name": datasets.Value("string"), "exists": datasets.Value("bool")}
    )
    rows = {"video": [clip, other, b"gone"], "name": ["one", "two", "three"], "exists": [True, True, False]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "out"
    args = ["codec-assets", "--hf-dataset", str(tmp_path / "saved"), "--key-column", "name", "--out", str(out)]
    assert main([*args, "--workers", "2", *ARGS]) == 0
    rows = read_index(out)
    assert [(r["key"], r["status"], r["video"]) for r in rows] == [
        ("one", "ok", f"{tmp_path / 'saved'}[0]"),
        ("two", "ok", f"{tmp_path / 'saved'}[1]"),
    ]
    assert_same_assets(out, "one", local, "clip")
    assert_same_assets(out, "two", local, "other")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["name"], r["exists"], r["video"], len(r["images"])) for r in records] == [
        ("one", True, rows[0]["video"], 2),
        ("two", True, rows[1]["video"], 2),
    ]  # every column kept; the bytes column names the row instead of holding the bytes
    if hasattr(datasets, "Video"):  # datasets >= 3.2: a Video column (a path, or bytes with the file's name)
        values = [{"bytes": other, "path": "named/other.mp4"}, str(clips / "clip.mp4")]
        video = datasets.Dataset.from_dict({"clip": values}, features=datasets.Features({"clip": datasets.Video()}))
    else:  # the same values as plain {bytes, path} structs
        values = [{"bytes": other, "path": "named/other.mp4"}, {"bytes": None, "path": str(clips / "clip.mp4")}]
        video = datasets.Dataset.from_dict({"clip": values})
    video.save_to_disk(str(tmp_path / "video"))
    jobs = expand_codec_inputs([datasets.load_from_disk(str(tmp_path / "video"))], path_column="clip")
    assert [(j.name, j.key) for j in jobs] == [("other.mp4", ""), ("clip.mp4", "")]  # keyed by the stems
    paths = datasets.Dataset.from_dict({"video": [str(clips / "clip.mp4"), ""], "caption": ["a", "b"]})
    memory = datasets.Dataset.from_dict({"video": [other]})  # no key column, no file name: keyed by row number
    settings = AssetSettings(frames=8, num_images=2, square_size=64, patch_size=16)
    inputs = [*jobs, *expand_codec_inputs([paths, memory])]
    report = write_assets(inputs, tmp_path / "mixed", settings, workers=2)
    assert [(r["key"], r["status"]) for r in report.rows] == [
        ("other", "ok"), ("clip", "ok"), ("clip-2", "ok"), ("", "failed"), ("0", "ok"),
    ]  # fmt: skip
    assert "the video column is ''" in report.rows[3]["error"]
    for key, source in (("other", "other"), ("clip", "clip"), ("clip-2", "clip"), ("0", "other")):
        assert_same_assets(tmp_path / "mixed", key, local, source)
    assert main(["codec-assets", "--out", str(tmp_path / "none"), *ARGS]) == 2  # no input at all
    assert main(["codec-assets", str(clips / "clip.mp4"), "--split", "train", "--out", str(tmp_path / "s")]) == 2
    (streamed,) = expand_codec_inputs([memory.to_iterable_dataset()])  # an IterableDataset: cached, then as one
    assert streamed.fetch() == other and streamed.name == "0"
    with pytest.raises(ValueError, match="path_column='video' is not a column of the dataset"):
        expand_codec_inputs([video])


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this module on the loopback address alone (as the library's own local start binds it)."""
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {name: os.environ.get(name) for name in loopback}
    os.environ.update(loopback)
    ray = pytest.importorskip("ray", reason="Ray (the 'ray' extra) is not installed")
    from ray._private import ray_constants

    saved_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
    try:
        yield ray
    finally:
        ray.shutdown()
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


@pytest.mark.ray
def test_ray_and_local_write_identical_assets_from_files_tars_and_urls(local_ray, server, tmp_path):
    """The same few clips as local files, a tar shard and URLs: Ray tasks write the local run's bytes (npy and
    JPEG; the JPEG encoder is deterministic), and the mosaics before JPEG are equal too."""
    ray = local_ray
    folder = tmp_path / "clips"
    folder.mkdir()
    for seed in range(4):
        write_moving_clip(folder / f"c{seed}.mp4", frames=10, size=64, seed=seed + 2)
    shard = write_tar(tmp_path / "shard.tar", [("t0.mp4", (folder / "c0.mp4").read_bytes())])
    inputs = [str(folder), str(shard), f"{server}/clip.mp4"]
    runs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        args = ["codec-assets", *inputs, "--out", str(out), "--engine", engine, *ARGS]
        assert main(args) == 0
        runs[engine] = read_index(out)
    keys = [r["key"] for r in runs["local"]]
    assert keys == ["c0", "c1", "c2", "c3", "t0", "clip"] and [r["key"] for r in runs["ray"]] == keys
    for key in keys:
        for name in FILES:
            local = (tmp_path / "local" / "assets" / key / name).read_bytes()
            assert (tmp_path / "ray" / "assets" / key / name).read_bytes() == local, f"{key}/{name}"
    from hevc_vit.codec.assets import AssetSettings, compute_assets

    settings = AssetSettings(frames=8, num_images=2, square_size=64, patch_size=16)
    task = ray.remote(num_cpus=1)(lambda path: compute_assets(path, settings))
    for path in sorted(folder.iterdir()):
        here, there = compute_assets(path, settings), ray.get(task.remote(str(path)))
        assert np.array_equal(here.mosaics, there.mosaics) and np.array_equal(here.positions, there.positions)
