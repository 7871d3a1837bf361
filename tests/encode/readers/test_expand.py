"""``hevc-vit encode`` sources: the same images given as loose files, webdataset tar shards, tables of paths, a
``datasets.Dataset``, ``memory://`` URLs, PIL images, arrays and tensors give identical features and matching
index rows; bad tars, tables, URLs and dataset rows give failed rows (or a clear error); exit statuses."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hevc_vit import HEVCViTPackingModel
from hevc_vit.cli import main as cli_main
from hevc_vit.encode import encode, iter_features, read_index
from hevc_vit.encode.readers.expand import expand_braces
from hevc_vit.encode.readers.remote import with_retries
from tests.helpers import FIXTURES, crash_on_forward, without_shard, write_tar
from tests.helpers.media import write_clip
from tests.helpers.sources import CAPTIONS, OPTIONS, SIZES, jpeg, saved_dataset, source

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
fsspec = pytest.importorskip("fsspec", reason="fsspec (the 'data' extra) is not installed")

# not "key": the shard key numbers the run's work units (a file, a tar shard, a row group), so it differs by source
ROW_FIELDS = ("shape", "grid_thw", "status", "error", "kind", "size")


@pytest.fixture(scope="module")
def model() -> HEVCViTPackingModel:
    return HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny")


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def loose(tmp_path_factory, blobs) -> Path:
    folder = tmp_path_factory.mktemp("loose")
    for i, data in enumerate(blobs):
        (folder / f"{i:06d}.jpg").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def reference(model, loose, tmp_path_factory):
    """The loose files encoded: (rows, features in input order)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    encode(sorted(loose.iterdir()), out, model=model, **OPTIONS)
    return read_index(out), [tensors for _, tensors in iter_features(out)]


KINDS = ["tar", "memory-tar", "parquet", "csv", "tsv", "jsonl", "dataset", "iterable-dataset", "memory", "memory-glob"]
KINDS += ["pil", "numpy", "tensor"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_gives_the_features_and_rows_of_loose_files(model, loose, blobs, reference, tmp_path, kind):
    inputs, extra = source(kind, tmp_path, loose, blobs)
    workers = 2 if kind in ("tar", "dataset") else 0  # forked workers read tar members and dataset rows too
    result = encode(inputs, tmp_path / "out", model=model, **{**OPTIONS, "workers": workers, **extra})
    rows, features = read_index(tmp_path / "out"), [t for _, t in iter_features(tmp_path / "out")]
    ref_rows, ref_features = reference
    assert result.encoded == len(blobs) and result.failed == 0, rows
    assert [{k: r.get(k) for k in ROW_FIELDS} for r in rows] == [{k: r.get(k) for k in ROW_FIELDS} for r in ref_rows]
    assert sorted(r["key"] for r in rows) == [r["key"] for r in rows] and len({r["key"] for r in rows}) == len(rows)
    for got, want in zip(features, ref_features):
        for name in ("patches", "pooled", "grid_thw"):
            assert torch.equal(got[name], want[name]), (kind, name)
    if kind in ("tar", "memory-tar"):  # the sample key is the id; the path opens with fsspec as it is
        assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(len(blobs))]
        with fsspec.open(rows[3]["path"]) as f:
            assert f.read() == blobs[3]
    if "keep_columns" in extra:
        assert [r["caption"] for r in rows] == CAPTIONS
    if kind in ("dataset", "pil"):
        assert [r["id"] for r in rows] == [str(i) for i in range(len(blobs))]


def test_a_tar_of_same_size_jpegs_is_images_never_a_video(model, tmp_path):
    """The bug: such a tar was handed to PyAV and encoded as one 8-frame clip with status ok."""
    members = [(f"{i:03d}.jpg", jpeg(32, 32, i)) for i in range(8)]
    folder = tmp_path / "in"
    folder.mkdir()
    write_tar(folder / "same.tar", members)
    (folder / "renamed.bin").write_bytes((folder / "same.tar").read_bytes())  # a tar without its extension
    encode([folder], tmp_path / "out", model=model, **OPTIONS)
    rows = read_index(tmp_path / "out")
    images = [r for r in rows if r["path"].startswith("tar://")]
    assert len(images) == 8 and all(r["status"] == "ok" and r["kind"] == "image" for r in images)
    (renamed,) = [r for r in rows if r["path"].endswith("renamed.bin")]
    assert renamed["status"] == "failed" and "a tar archive, not an image or a video" in renamed["error"]


def test_damaged_tar_shards_give_failed_rows_and_the_rest_encodes(model, tmp_path):
    good = jpeg(40, 40, 0)
    members = [
        ("000.jpg", good),
        ("000.json", b"{}"),
        ("001.jpg", b"not a jpeg at all"),  # a member that is not an image
        ("002.txt", b"only text"),  # a sample without an image
        ("003.png", good),
        ("004.jpg", good),
    ]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    last = tarfile.open(tmp_path / "whole.tar").getmember("004.jpg")
    (tmp_path / "cut_in_data.tar").write_bytes(whole[: last.offset_data + 100])  # the last member cut short
    (tmp_path / "cut_in_header.tar").write_bytes(whole[: last.offset + 300])  # cut inside the last header
    encode([tmp_path / "cut_in_data.tar", tmp_path / "cut_in_header.tar"], tmp_path / "out", model=model, **OPTIONS)
    rows = {(Path(r["path"].split("::")[-1]).name, r.get("id")): r for r in read_index(tmp_path / "out")}
    for shard in ("cut_in_data.tar", "cut_in_header.tar"):
        assert rows[(shard, "000")]["status"] == "ok" and rows[(shard, "003")]["status"] == "ok"
        assert rows[(shard, "001")]["status"] == "failed" and "not an image" in rows[(shard, "001")]["error"]
        assert "no image or video member (members: 002.txt)" in rows[(shard, "002")]["error"]
    assert "the shard is truncated" in rows[("cut_in_data.tar", "004")]["error"]
    assert "damaged after 4 samples" in rows[("cut_in_header.tar", None)]["error"]


def test_a_table_without_its_path_column_is_an_error_naming_the_columns(model, loose, tmp_path, capsys):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"file_name": ["a.jpg"], "caption": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"has no column path, url or image.*\['file_name', 'caption'\]"):
        encode([tmp_path / "t.parquet"], tmp_path / "o1", model=model, **OPTIONS)
    with pytest.raises(ValueError, match=r"path_column='url' is not a column; the table has \['file_name', 'capt"):
        encode([tmp_path / "t.parquet"], tmp_path / "o2", model=model, path_column="url", **OPTIONS)
    with pytest.raises(ValueError, match=r"keep_columns \['nope'\] are not columns"):
        encode(
            [tmp_path / "t.parquet"],
            tmp_path / "o3",
            model=model,
            path_column="file_name",
            keep_columns="nope",
            **OPTIONS,
        )
    args = ["encode", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o4"), "-q"]
    assert cli_main(args + ["--model", str(FIXTURES / "llava_vit_packing_tiny")]) == 2
    assert "['file_name', 'caption']" in capsys.readouterr().err


def test_table_rows_keep_their_columns_and_an_empty_path_is_a_failed_row(model, loose, tmp_path):
    lines = [{"url": "000000.jpg", "caption": "kept"}, {"url": None, "caption": "empty"}]
    (loose / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))  # relative to the table
    try:
        encode([loose / "rows.jsonl"], tmp_path / "out", model=model, keep_columns=["caption"], **OPTIONS)
    finally:
        (loose / "rows.jsonl").unlink()
    ok, failed = read_index(tmp_path / "out")
    assert ok["status"] == "ok" and ok["path"] == str(loose / "000000.jpg") and ok["caption"] == "kept"
    assert failed["status"] == "failed" and "the url column is empty" in failed["error"]
    assert failed["caption"] == "empty"


def test_a_dataset_row_whose_image_is_none_is_a_failed_row(model, blobs, tmp_path):
    ds = saved_dataset(tmp_path, blobs[:2], images=[{"bytes": blobs[0], "path": None}, None])
    result = encode(ds, tmp_path / "out", model=model, keep_columns=("caption",), **OPTIONS)
    ok, failed = read_index(tmp_path / "out")
    assert result.encoded == 1 and result.failed == 1 and ok["status"] == "ok"
    assert failed["status"] == "failed" and "'image' column of row 1 is None" in failed["error"]
    assert failed["id"] == "1" and failed["caption"] == CAPTIONS[1]
    with pytest.raises(ValueError, match=r"image_column='picture' is not a column of the dataset; it has \['image'"):
        encode(ds, tmp_path / "o2", model=model, image_column="picture", **OPTIONS)


def test_bad_arrays_are_failed_rows(model, tmp_path):
    good = np.zeros((28, 28, 3), np.uint8)
    bad = [np.zeros((2, 28, 28, 3), np.uint8), np.full((28, 28), np.nan), np.zeros((28, 28), np.int64)]
    encode([good, *bad], tmp_path / "out", model=model, **OPTIONS)
    rows = read_index(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "failed"]
    assert [r["path"] for r in rows] == ["object[0]", "object[1]", "object[2]", "object[3]"]
    assert "expected (H, W) or (H, W, C)" in rows[1]["error"] and "NaN" in rows[2]["error"]
    assert "dtype int64" in rows[3]["error"]


class FlakyFileSystem(fsspec.AbstractFileSystem):
    """A store whose reads fail with a network error: ``failures[path]`` times (-1: always)."""

    protocol = "hevcflaky"
    files: dict[str, bytes] = {}
    failures: dict[str, int] = {}
    attempts: dict[str, int] = {}

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        self.attempts[path] = self.attempts.get(path, 0) + 1
        left = self.failures.get(path, 0)
        if left:
            self.failures[path] = left - 1 if left > 0 else left
            raise ConnectionError(f"simulated network error reaching {path}")
        return io.BytesIO(self.files[path])


def test_unreachable_urls_fail_after_the_retries_and_the_run_goes_on(model, loose, blobs, tmp_path, monkeypatch):
    monkeypatch.setattr("hevc_vit.encode.readers.remote.RETRY_PAUSE", 0)
    fsspec.register_implementation("hevcflaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.files = {"x/down.jpg": blobs[0], "x/flaky.jpg": blobs[1]}
    FlakyFileSystem.failures = {"x/down.jpg": -1, "x/flaky.jpg": 2}
    FlakyFileSystem.attempts = {}
    inputs = ["hevcflaky://x/down.jpg", "hevcflaky://x/flaky.jpg", f"file://{tmp_path}/missing.jpg"]
    inputs += [f"file://{tmp_path}/nowhere/", loose]
    result = encode(inputs, tmp_path / "out", model=model, retries=2, **OPTIONS)
    rows = {r["path"]: r for r in read_index(tmp_path / "out")}
    down = rows["hevcflaky://x/down.jpg"]
    assert down["status"] == "failed" and "failed after 3 attempts" in down["error"]
    assert "simulated network error" in down["error"] and FlakyFileSystem.attempts["x/down.jpg"] == 3
    assert rows["hevcflaky://x/flaky.jpg"]["status"] == "ok"  # the third attempt read it
    assert "No such file" in rows[f"file://{tmp_path}/missing.jpg"]["error"]  # not retried: it is not there
    assert rows[f"file://{tmp_path}/nowhere/"]["error"] == "no such file or folder"
    assert result.encoded == 1 + len(blobs) and result.failed == 3


def test_exit_status_and_json_summary(loose, tmp_path, capsys):
    ckpt = str(FIXTURES / "llava_vit_packing_tiny")
    base = ["encode", "--model", ckpt, "--workers", "0", "--min-image-tokens", "4", "--max-image-tokens", "48"]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    good = str(loose / "000000.jpg")
    assert cli_main(base + [good, "--out", str(tmp_path / "a"), "-q"]) == 0
    assert cli_main(base + [good, str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "b")]) == 1
    assert "1 input failed: each has a row with status 'failed'" in capsys.readouterr().out
    args = base + [good, str(tmp_path / "bad.jpg"), "--allow-failures", "--json", "-q", "--out", str(tmp_path / "c")]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["encoded"] == 1 and summary["failed"] == 1 and summary["exit_status"] == 0
    assert summary["failures"][0]["path"] == str(tmp_path / "bad.jpg")
    assert cli_main(base + [str(tmp_path / "bad.jpg"), "--allow-failures", "-q", "--out", str(tmp_path / "d")]) == 1
    with pytest.raises(SystemExit) as stop:  # out of range: refused while parsing
        cli_main(base + [good, "--retries", "-1", "--out", str(tmp_path / "e")])
    assert stop.value.code == 2 and not (tmp_path / "e").exists()


def test_cli_hf_dataset_saved_to_disk(blobs, tmp_path, capsys):
    saved_dataset(tmp_path, blobs)
    ckpt = str(FIXTURES / "llava_vit_packing_tiny")
    args = ["encode", "--hf-dataset", str(tmp_path / "saved"), "--model", ckpt, "--workers", "0", "--json", "-q"]
    assert cli_main(args + ["--keep-columns", "caption", "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["encoded"] == len(blobs)
    rows = read_index(tmp_path / "out")
    assert [r["path"] for r in rows] == [f"{tmp_path / 'saved'}[{i}]" for i in range(len(blobs))]
    assert [r["caption"] for r in rows] == CAPTIONS
    assert cli_main(args + ["--split", "test", "--out", str(tmp_path / "o2")]) == 0  # a Dataset has no splits
    assert cli_main(["encode", "--split", "train", "--out", str(tmp_path / "o3"), "-q"]) == 2


def test_resume_with_tar_and_parquet_inputs_equals_an_uninterrupted_run(model, loose, blobs, tmp_path):
    tar_inputs, _ = source("tar", tmp_path, loose, blobs)
    table_inputs, extra = source("parquet", tmp_path, loose, blobs[:3])
    inputs = tar_inputs + table_inputs
    options = dict(model=model, max_tokens=24, shard_size_mb=0, **OPTIONS, **extra)  # one shard per forward
    with crash_on_forward(model):
        encode(inputs, tmp_path / "run", **options)
    resumed = encode(inputs, tmp_path / "run", resume=True, **options)
    whole = encode(inputs, tmp_path / "whole", **options)
    assert 0 < resumed.skipped < 8 and resumed.encoded + resumed.skipped == whole.encoded == 8
    assert without_shard(read_index(tmp_path / "run")) == without_shard(read_index(tmp_path / "whole"))
    for (row, a), (_, b) in zip(iter_features(tmp_path / "run"), iter_features(tmp_path / "whole")):
        assert torch.equal(a["patches"], b["patches"]), row["path"]


def test_expand_braces():
    assert expand_braces("d-{000..002}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("s3://b/x-{08..10}.tar") == ["s3://b/x-08.tar", "s3://b/x-09.tar", "s3://b/x-10.tar"]
    assert expand_braces("plain{x}.jpg") == ["plain{x}.jpg"]


@pytest.mark.video
def test_a_clip_in_a_tar_equals_the_loose_clip(model, tmp_path):
    pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

    clip = write_clip(tmp_path / "clip.mp4", 10)
    write_tar(tmp_path / "clips.tar", [("000.mp4", clip.read_bytes()), ("000.json", b"{}")])
    encode([clip], tmp_path / "loose", model=model, **OPTIONS)
    encode([tmp_path / "clips.tar"], tmp_path / "tar", model=model, **OPTIONS)
    (a_row, a), (b_row, b) = next(iter_features(tmp_path / "loose")), next(iter_features(tmp_path / "tar"))
    assert b_row["kind"] == "video" and b_row["frames"] == a_row["frames"] and b_row["id"] == "000"
    assert torch.equal(a["patches"], b["patches"]) and torch.equal(a["pooled"], b["pooled"])


@pytest.mark.parametrize(
    "error", [FileNotFoundError("gone"), PermissionError("no"), ValueError("bad url"), NotImplementedError("no ls")]
)
def test_errors_another_attempt_cannot_cure_are_not_retried(monkeypatch, error):
    monkeypatch.setattr("hevc_vit.encode.readers.remote.RETRY_PAUSE", 0)
    calls = []

    def fail():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        with_retries(fail, retries=3, what="reading x")
    assert len(calls) == 1


def test_other_errors_are_retried_then_named_with_the_attempts(monkeypatch):
    monkeypatch.setattr("hevc_vit.encode.readers.remote.RETRY_PAUSE", 0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "data"

    assert with_retries(flaky, retries=3, what="reading x") == "data" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError, match=r"reading x failed after 2 attempts: ConnectionError: reset by peer"):
        with_retries(flaky, retries=1, what="reading x")
    assert len(calls) == 2


def test_a_saved_dataset_of_several_splits_and_no_train_split_names_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    from hevc_vit.encode.readers.memory import open_hf_dataset

    one = datasets.Dataset.from_dict({"x": [1]})
    datasets.DatasetDict({"val": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"no --split given and no 'train' split: .* has the splits \['val', 'test'\]"):
        open_hf_dataset(str(tmp_path / "dd"), None)
    with pytest.raises(ValueError, match=r"--split 'dev': .* has the splits"):
        open_hf_dataset(str(tmp_path / "dd"), "dev")
    assert open_hf_dataset(str(tmp_path / "dd"), "test").name.endswith(":test")
