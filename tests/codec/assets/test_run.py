"""A codec-assets run (``write_assets`` and ``hevc-vit codec-assets``): the index and manifest, the reference's
consumers reading our folder (its ``train.py`` record lines and its lmms-eval asset lookup, vendored), resume,
bad input, and worker processes."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from hevc_vit.cli import main
from hevc_vit.codec import AssetSettings, write_assets
from hevc_vit.codec.assets import INDEX, MANIFEST, Job, read_index, run, writer
from tests.helpers import run_encode_cli
from tests.helpers.codec_clips import write_moving_clip
from tests.helpers.media import write_clip
from tests.helpers.reference_codec_assets import _is_done, _offline_load_visuals_and_positions, reference_read_record

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video  # PyAV encodes and decodes the clips

SETTINGS = AssetSettings(frames=8, num_images=2, square_size=64, patch_size=16)
ARGS = ["--frames", "8", "--num-images", "2", "--square-size", "64", "--patch-size", "16"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for name, seed in (("a", 0), ("b", 1)):
        write_moving_clip(folder / f"{name}.mp4", frames=10, size=64, seed=seed)
    return folder


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def files_under(folder) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names}


def test_the_reference_consumers_read_our_assets(tmp_path, clips):
    jobs = tmp_path / "jobs.jsonl"
    conversation = [{"from": "human", "value": "<image>\nWhat moves?"}, {"from": "gpt", "value": "A square."}]
    lines = [
        {"video": str(clips / "a.mp4"), "key": "first", "conversations": conversation, "id": 1},
        {"video": str(clips / "b.mp4"), "key": "second", "exists": False},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    report = write_assets([jobs], out, SETTINGS)
    assert [(r["key"], r["status"]) for r in report.rows] == [("first", "ok")]  # exists: false is skipped
    folder = out / "assets" / "first"
    positions = np.load(folder / "positions_thw.npy")
    assert _is_done(folder, 2)  # the reference's own "done" rule
    # train.py: the record's positions_thw (np.load, unsqueezed) and images (< 9: the image branch)
    (record,) = read_jsonl(out / MANIFEST)
    assert record["conversations"] == conversation and record["id"] == 1 and record["video"] == lines[0]["video"]
    patch_positions, branch, images = reference_read_record(record)
    assert branch == "image" and [im.size for im in images] == [(64, 64)] * 2
    assert patch_positions.shape == (1, 2 * 16, 3) and torch.equal(patch_positions[0], torch.from_numpy(positions))
    # lmms-eval: by the video's stem under the assets root, and through the meta.json index from OUT
    for root in (out / "assets", out):
        visuals, pos, chosen = _offline_load_visuals_and_positions(lines[0]["video"], str(root), max_images=2)
        assert chosen == str(folder) or (root == out / "assets" and chosen == str(root / "a"))
        assert visuals is not None and len(visuals) == 2 and torch.equal(pos[0], torch.from_numpy(positions).long())
    visuals, pos, chosen = _offline_load_visuals_and_positions("/elsewhere/first.mp4", str(out), max_images=2)
    assert chosen == str(folder)  # by key too
    decoded = np.asarray(visuals[0]).astype(int)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key"] == "first" and meta["settings"] == SETTINGS.as_dict() and decoded.shape == (64, 64, 3)


def test_png_mosaics_are_found_by_the_reference_consumers_and_never_mix_with_jpeg(tmp_path, clips):
    """``mosaic_format="png"``: the manifest lists the PNGs, train.py's record lines and the lmms-eval lookup (its
    ``mosaic*.png`` glob) read them, and they hold the mosaics exactly; a format is part of "done" and of the
    settings check, and a folder rewritten in the other format keeps no file of the first."""
    from hevc_vit.codec.assets import compute_assets

    png = AssetSettings(frames=8, num_images=2, square_size=64, patch_size=16, mosaic_format="png")
    out = tmp_path / "out"
    assert not write_assets([clips / "a.mp4"], out, png).failed
    folder = out / "assets" / "a"
    assert sorted(p.name for p in folder.glob("mosaic*")) == ["mosaic_000.png", "mosaic_001.png"]
    mosaics = compute_assets(clips / "a.mp4", png).mosaics
    (record,) = read_jsonl(out / MANIFEST)
    assert record["images"] == [str(folder.resolve() / f"mosaic_00{i}.png") for i in range(2)]
    patch_positions, branch, images = reference_read_record(record)
    assert branch == "image" and np.array_equal(np.stack([np.asarray(im) for im in images]), mosaics)
    visuals, pos, chosen = _offline_load_visuals_and_positions(str(clips / "a.mp4"), str(out), max_images=8)
    assert chosen == str(folder) and np.array_equal(np.stack([np.asarray(v) for v in visuals]), mosaics)
    assert torch.equal(pos, patch_positions.long())
    cli = tmp_path / "cli"
    assert main(["codec-assets", str(clips / "a.mp4"), "--out", str(cli), *ARGS, "--mosaic-format", "png", "-q"]) == 0
    assert (cli / "assets" / "a" / "mosaic_001.png").read_bytes() == (folder / "mosaic_001.png").read_bytes()
    assert not writer.is_done(folder, SETTINGS) and writer.is_done(folder, png)  # the format is part of "done"
    with pytest.raises(ValueError, match="mosaic_format differ"):
        write_assets([clips / "a.mp4"], out, SETTINGS, resume=True)
    jpeg = tmp_path / "jpeg"
    write_assets([clips / "a.mp4"], jpeg, png)
    writer.write_asset_folder(jpeg / "assets" / "a", compute_assets(clips / "a.mp4", SETTINGS), SETTINGS, "a", "a")
    assert sorted(p.name for p in (jpeg / "assets" / "a").glob("mosaic*")) == ["mosaic_000.jpg", "mosaic_001.jpg"]
    meta = json.loads((jpeg / "assets" / "a" / "meta.json").read_text())
    legacy = {k: v for k, v in meta["settings"].items() if k != "mosaic_format"}  # written before the option
    (jpeg / "assets" / "a" / "meta.json").write_text(json.dumps({**meta, "settings": legacy}))
    assert writer.is_done(jpeg / "assets" / "a", SETTINGS)  # a record without the format is a jpg one


def test_resume_skips_done_keys_and_refuses_other_settings(tmp_path, clips, monkeypatch):
    out = tmp_path / "out"
    real, calls = writer.write_atomic, []

    def disk_full_on_b(path, data):
        calls.append(path)
        if "assets/b/" in str(path) and path.name == "positions_thw.npy":
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(writer, "write_atomic", disk_full_on_b)
    first = write_assets([clips], out, SETTINGS)
    assert [(r["key"], r["status"]) for r in first.rows] == [("a", "ok"), ("b", "failed")]
    assert "No space left" in first.rows[1]["error"] and not _is_done(out / "assets" / "b", 2)
    monkeypatch.setattr(writer, "write_atomic", real)
    with pytest.raises(ValueError, match="already holds a codec-assets run"):
        write_assets([clips], out, SETTINGS)
    with pytest.raises(ValueError, match="jpeg_quality differ"):
        write_assets([clips], out, AssetSettings(frames=8, num_images=2, square_size=64, jpeg_quality=80), resume=True)
    before = (out / "assets" / "a" / "mosaic_000.jpg").stat().st_mtime_ns
    second = write_assets([clips], out, SETTINGS, resume=True)
    assert [(r["key"], r["status"], r.get("resumed", False)) for r in second.rows] == [
        ("a", "ok", True),
        ("b", "ok", False),
    ]
    assert (out / "assets" / "a" / "mosaic_000.jpg").stat().st_mtime_ns == before
    assert len(read_jsonl(out / MANIFEST)) == 2 and read_jsonl(out / INDEX) == second.rows


def test_bad_inputs_are_failed_rows_and_nothing_lands_outside(tmp_path, clips):
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    (tmp_path / "empty.mp4").write_bytes(b"")
    write_clip(tmp_path / "still.mp4", 1, width=64, height=64)
    write_clip(tmp_path / "tiny.mp4", 4, width=8, height=8)
    good = str(clips / "a.mp4")
    jobs = [
        Job("missing", str(tmp_path / "missing.mp4")),
        Job("audio", str(audio)),
        Job("empty", str(tmp_path / "empty.mp4")),
        Job("still", str(tmp_path / "still.mp4")),
        Job("tiny", str(tmp_path / "tiny.mp4")),
        Job("../escape", good),
        Job("a/b", good),
        Job("", good),
        Job("ok", good),
        Job("ok", str(clips / "b.mp4")),
    ]
    before = files_under(tmp_path)
    report = write_assets(jobs, tmp_path / "out", SETTINGS)
    errors = {(r["key"], i): r.get("error", "") for i, r in enumerate(report.rows)}
    expected = [
        "does not exist",
        "has no video stream",
        "empty file (0 bytes)",
        "has 1 frame(s); codec assets need at least 2",
        "is 8x8; expected both sides >= patch_size=16",
        "key '../escape'",
        "key 'a/b'",
        "key ''",
        "",
        "duplicate key 'ok'",
    ]
    for (key, i), want in zip(errors, expected):
        assert want in errors[(key, i)], (key, errors[(key, i)])
    assert [r["status"] for r in report.rows] == ["failed"] * 8 + ["ok", "failed"]
    outside = {f for f in files_under(tmp_path) - before if not f.startswith("out" + os.sep)}
    assert outside == set()
    assert sorted(os.listdir(tmp_path / "out" / "assets")) == ["ok"]  # no folder for a failed video
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"video": good, "key": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl line 2 is not valid JSON"):
        write_assets([broken], tmp_path / "out2", SETTINGS)
    assert not (tmp_path / "out2").exists()


def test_the_command_line_exit_statuses(tmp_path, clips, capsys):
    assert main(["codec-assets", str(clips), "--out", str(tmp_path / "o1"), "--preview", *ARGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(tmp_path / "o1"), "ok": 2, "failed": 0, "total": 2}
    assert (tmp_path / "o1" / "assets" / "a" / "mosaic_001.jpg").is_file()
    assert sorted(os.listdir(tmp_path / "o1" / "previews")) == ["a.png", "b.png"]  # outside assets/: the lookup
    assert sorted(os.listdir(tmp_path / "o1" / "assets" / "a")) == [
        "frame_ids.npy",
        "meta.json",
        "mosaic_000.jpg",
        "mosaic_001.jpg",
        "positions_thw.npy",
        "visible_indices.npy",
    ]
    missing = str(tmp_path / "missing.mp4")
    assert main(["codec-assets", str(clips / "a.mp4"), missing, "--out", str(tmp_path / "o2"), *ARGS]) == 1
    assert "missing.mp4 does not exist" in capsys.readouterr().err
    args = ["codec-assets", str(clips / "a.mp4"), missing, "--out", str(tmp_path / "o3"), "--allow-failures", *ARGS]
    assert main(args) == 0
    assert main(["codec-assets", str(clips), "--out", str(tmp_path / "o1"), *ARGS]) == 2  # not resumed
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert main(["codec-assets", str(clips), "--out", str(tmp_path / "o1"), "--resume", *ARGS]) == 0
    assert main(["codec-assets", str(clips), "--out", str(tmp_path / "o4"), "--square-size", "100"]) == 2


def test_worker_processes_write_the_same_bytes_and_time_out(tmp_path, clips):
    one = write_assets([clips], tmp_path / "one", SETTINGS)
    two = write_assets([clips], tmp_path / "two", SETTINGS, workers=2)
    assert [r["status"] for r in one.rows] == [r["status"] for r in two.rows] == ["ok", "ok"]
    for key in ("a", "b"):
        for name in ("positions_thw.npy", "visible_indices.npy", "frame_ids.npy", "mosaic_000.jpg", "mosaic_001.jpg"):
            a = (tmp_path / "one" / "assets" / key / name).read_bytes()
            assert a == (tmp_path / "two" / "assets" / key / name).read_bytes(), (key, name)
    late = write_assets([clips], tmp_path / "late", SETTINGS, workers=2, timeout=1e-4)
    assert [r["status"] for r in late.rows] == ["failed", "failed"]
    assert all("took longer than timeout" in r["error"] for r in late.rows)


def _die(*args, **kwargs):
    os._exit(3)  # a decoder crash takes the whole worker process down


def _hang(*args, **kwargs):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a decoder stuck in C code: no alarm gets in
    time.sleep(3600)


def test_a_worker_that_dies_fails_its_videos_and_the_index_is_still_written(tmp_path):
    # the workers are fresh interpreters (no fork): the crash travels in the jobs, as a tar's or URL's fetch does
    jobs = [Job(key=key, video=f"{key}.mp4", fetch=_die, name=f"{key}.mp4") for key in ("a", "b")]
    report = write_assets(jobs, tmp_path / "out", SETTINGS, workers=2)
    assert [r["status"] for r in report.rows] == ["failed", "failed"]
    assert all("BrokenProcessPool" in r["error"] for r in report.rows)
    assert read_jsonl(tmp_path / "out" / INDEX) == report.rows and read_jsonl(tmp_path / "out" / MANIFEST) == []


@pytest.mark.slow
def test_a_worker_stuck_beyond_its_timeout_is_ended_and_its_video_fails(tmp_path, clips, monkeypatch):
    """The main process never waits on a worker unbounded: a video whose decoder ignores the alarm fails after
    the per-video timeout plus the margin; the stuck worker is ended and the other video is still written."""
    monkeypatch.setattr(run, "WORKER_MARGIN_S", 2.0)
    stuck = Job(key="stuck", video="stuck.mp4", fetch=_hang, name="stuck.mp4")
    jobs = [stuck, Job(key="a", video=str(clips / "a.mp4"))]
    start = time.monotonic()
    report = write_assets(jobs, tmp_path / "out", SETTINGS, workers=2, timeout=15.0)
    assert time.monotonic() - start < 60
    stuck, done = report.rows
    assert stuck["status"] == "failed" and stuck["error"].startswith("TimeoutError: no answer from the worker")
    assert done["status"] == "ok" and writer.is_done(tmp_path / "out" / "assets" / "a", SETTINGS)
    assert read_jsonl(tmp_path / "out" / INDEX) == report.rows


def test_shards_into_one_folder_equal_one_run(tmp_path, clips):
    whole = write_assets([clips], tmp_path / "whole", SETTINGS)
    parts = [write_assets([clips], tmp_path / "parts", SETTINGS, shard_id=i, num_shards=2) for i in (0, 1)]
    assert [[r["key"] for r in part.rows] for part in parts] == [["a"], ["b"]]
    assert sorted(os.listdir(tmp_path / "parts")) == [
        "assets",
        "codec_assets.json",
        "index-00000-of-00002.jsonl",
        "index-00001-of-00002.jsonl",
        "manifest-00000-of-00002.jsonl",
        "manifest-00001-of-00002.jsonl",
    ]
    strip = lambda rows: sorted((r["key"], r["status"]) for r in rows)  # noqa: E731
    assert strip(read_index(tmp_path / "parts")) == strip(whole.rows)
    for key in ("a", "b"):
        for name in ("positions_thw.npy", "visible_indices.npy", "frame_ids.npy", "mosaic_000.jpg", "mosaic_001.jpg"):
            got = (tmp_path / "parts" / "assets" / key / name).read_bytes()
            assert got == (tmp_path / "whole" / "assets" / key / name).read_bytes(), (key, name)
    with pytest.raises(ValueError, match="shard_id=2; expected an integer from 0 to num_shards - 1 = 1"):
        write_assets([clips], tmp_path / "x", SETTINGS, shard_id=2, num_shards=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_ranks_take_their_shards(tmp_path, clips):
    out = tmp_path / "out"
    result = run_encode_cli(2, ["codec-assets", str(clips), "--out", str(out), *ARGS], timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("index*.jsonl")) == [
        "index-00000-of-00002.jsonl",
        "index-00001-of-00002.jsonl",
    ]
    assert sorted((r["key"], r["status"]) for r in read_index(out)) == [("a", "ok"), ("b", "ok")]
    whole = write_assets([clips], tmp_path / "whole", SETTINGS)
    for row in whole.rows:
        name = "positions_thw.npy"
        assert (out / "assets" / row["key"] / name).read_bytes() == (
            tmp_path / "whole" / "assets" / row["key"] / name
        ).read_bytes()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_tasks_write_the_same_bytes_as_local(tmp_path, clips):
    pytest.importorskip("ray", reason="Ray is not installed")
    local = write_assets([clips], tmp_path / "local", SETTINGS)
    on_ray = write_assets([clips], tmp_path / "ray", SETTINGS, engine="ray", preview=True)
    assert [(r["key"], r["status"]) for r in on_ray.rows] == [(r["key"], r["status"]) for r in local.rows]
    for key in ("a", "b"):
        for name in ("positions_thw.npy", "visible_indices.npy", "frame_ids.npy", "mosaic_000.jpg", "mosaic_001.jpg"):
            got = (tmp_path / "ray" / "assets" / key / name).read_bytes()
            assert got == (tmp_path / "local" / "assets" / key / name).read_bytes(), (key, name)
    assert (tmp_path / "ray" / "previews" / "a.png").is_file()
    with pytest.raises(ValueError, match="engine='spark'"):
        write_assets([clips], tmp_path / "x", SETTINGS, engine="spark")
