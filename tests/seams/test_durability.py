"""The output folder of ``hevc-vit encode`` across ``kill -9``, a full disk and ``--resume``, in every output format.

A run is killed (``os._exit`` in a child process, as ``kill -9`` would end it: no cleanup runs) at each step of
writing a part: its temporary files written, the ``.npy`` of an npy-parquet part published alone, the part
published before its rows, its rows half appended, the index merged before the rank files are removed, and a
resume killed as it settles the folder. Each is resumed and compared with an uninterrupted run: the same rows,
the same features, each input stored once, no file that no row names. Keys stay with their inputs across
resumes given other inputs; a retried failure replaces its row; a full disk (simulated at every write seam, and
a real one on a small tmpfs where the system allows it) ends with one line and resumes to the same folder.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hevc_vit.cli import main as cli_main
from hevc_vit.encode import encode, read_index
from hevc_vit.encode.output import formats as part_formats
from hevc_vit.encode.output import index as index_files
from hevc_vit.encode.output import shards as shard_files
from hevc_vit.encode.output.formats import owned_files
from hevc_vit.encode.output.index import rank_index_files
from hevc_vit.processing.processors import NativeResolutionProcessor
from tests.helpers import (
    FIXTURES,
    assert_same_output,
    cli_args,
    disk_full_error,
    fill_the_disk_at_the_second_shard,
    subprocess_env,
    without_shard,
    write_image,
    write_tar,
)

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the 'data' extra) is not installed")
np = pytest.importorskip("numpy")

FORMATS = ("safetensors", "npy-parquet", "parquet")
PROC = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48, max_video_tokens=96)
OPTIONS = dict(processor=PROC, workers=0, progress=False, log=lambda m: None, max_tokens=40, shard_size_mb=0)
CLI_FORMAT = ("--max-tokens", "40", "--shard-size-mb", "0", "--storage-dtype", "float32", "--output-format")


SMALL = ("--workers", "0", "--min-image-tokens", "4", "--max-image-tokens", "48", "-q")


def _options(output_format: str) -> dict:
    return dict(OPTIONS, output_format=output_format, storage_dtype="float32")


# --------------------------------------------------------------------------------------------------
# what a folder holds, read from its files (not through its index)
# --------------------------------------------------------------------------------------------------


def part_files(out: Path, name: str) -> list[Path]:
    """The files of the part an index row names: an npy-parquet part's metadata has its ``.npy`` beside it."""
    path = out / name
    return [path, out / "embeddings" / (path.stem + ".npy")] if path.parent.name == "metadata" else [path]


def _stored(out: Path) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """``(part, key, tensors)`` for every item held by a part file in ``out``, whether a row names it or not."""
    from safetensors import safe_open

    items = []
    for path in owned_files(out):
        name = str(path.relative_to(out))
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                by_key: dict[str, dict[str, torch.Tensor]] = {}
                for tensor_name in f.keys():
                    key, _, what = tensor_name.rpartition(".")
                    by_key.setdefault(key, {})[what] = f.get_tensor(tensor_name)
            items += [(name, key, tensors) for key, tensors in by_key.items()]
        elif path.suffix == ".parquet":
            table = pq.read_table(path).to_pylist()
            pooled = None
            if path.parent.name == "metadata":
                pooled = np.load(path.parent.parent / "embeddings" / (path.stem + ".npy"))
            for i, item in enumerate(table):
                tensors = {"grid_thw": torch.tensor(item["grid_thw"])}
                vector = pooled[i] if pooled is not None else item.get("pooled")
                if vector is not None:
                    tensors["pooled"] = torch.tensor(np.asarray(vector, dtype=np.float32))
                if item.get("patches") is not None:
                    tensors["patches"] = torch.tensor(np.asarray(item["patches"], dtype=np.float32))
                items.append((name, item["key"], tensors))
    return items


def _check_folder(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A finished run's folder is consistent: one row per input, keys unique, no temporary or rank files, every
    part file named by a row and every ``ok`` row's item stored exactly once, in the part its row names.
    Returns the features by input path."""
    rows = read_index(out)
    assert len({row["path"] for row in rows}) == len(rows), Counter(row["path"] for row in rows).most_common(3)
    assert len({row["key"] for row in rows}) == len(rows), Counter(row["key"] for row in rows).most_common(3)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not rank_index_files(out)
    ok = [row for row in rows if row["status"] == "ok"]
    named = {p for row in ok for p in part_files(out, row["shard"])}
    assert set(owned_files(out)) == named, f"files no row names: {sorted(set(owned_files(out)) - named)}"
    stored = _stored(out)
    assert Counter(key for _, key, _ in stored) == Counter(row["key"] for row in ok)  # each input once
    where = {key: (part, tensors) for part, key, tensors in stored}
    features = {}
    for row in ok:
        part, tensors = where[row["key"]]
        assert part == row["shard"], (row, part)
        assert tensors["grid_thw"].tolist() == row["grid_thw"]
        features[row["path"]] = tensors
    return features


def _assert_same(got: Path, want: Path) -> None:
    assert_same_output(got, want, _check_folder)


@pytest.fixture(scope="module")
def whole(model, images, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run of the six images, per format."""
    root = tmp_path_factory.mktemp("whole")
    folders = {}
    for fmt in FORMATS:
        folders[fmt] = root / fmt
        encode([images], folders[fmt], model=model, **_options(fmt))
    return folders


# --------------------------------------------------------------------------------------------------
# kill -9 at every step of writing a part
# --------------------------------------------------------------------------------------------------

KILLED = 86  # the child's exit status when it killed itself at the chosen point

CHILD = r"""
import json, os, sys
from hevc_vit.encode import encode
from hevc_vit.encode.output import formats, index, shards
from hevc_vit.processing.processors import NativeResolutionProcessor

point, inputs, out, output_format, model, resume = json.loads(sys.argv[1])
calls = {"publish": 0, "parts": 0}

def die():
    os._exit(86)

def publish_new(tmp, final, real=formats.publish_new):
    calls["publish"] += 1
    if point == "tmp" and calls["publish"] == 1 and calls["parts"] == 1:
        die()  # the second part's temporary files written, nothing published
    real(tmp, final)
    if point == "npy" and final.suffix == ".npy" and calls["parts"] == 1:
        die()  # the .npy of the second part published, its metadata not

def append_rows(fd, rows, real=index.append_rows):
    if not rows or not rows[0].get("shard"):
        return real(fd, rows)
    calls["parts"] += 1
    calls["publish"] = 0
    if point == "published" and calls["parts"] == 2:
        die()  # the second part published, none of its rows appended
    if point == "torn" and len(rows) >= 2:
        data = index.rows_bytes(rows)
        os.write(fd, data[: data.index(b"\n") + 1 + 10])  # one whole row, and 10 bytes of the next
        die()
    return real(fd, rows)

def write_index(path, rows, real=index.write_index):
    real(path, rows)
    if point in ("merge", "settle"):
        die()  # the merged (or settled) index written, the rank files not yet removed

formats.publish_new = shards.publish_new = publish_new
index.append_rows, index.write_index = append_rows, write_index
processor = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48, max_video_tokens=96)
encode(inputs, out, model=model, processor=processor, workers=0, progress=False, log=lambda m: None,
       max_tokens=40, shard_size_mb=0, output_format=output_format, storage_dtype="float32", resume=resume)
"""


def _killed_run(point: str, inputs: list, out: Path, output_format: str, resume: bool = False) -> None:
    """``encode`` in a child process that ends itself with ``os._exit`` (no cleanup, as ``kill -9``) at ``point``."""
    args = [point, [str(i) for i in inputs], str(out), output_format, str(FIXTURES / "llava_vit_packing_tiny"), resume]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == KILLED, child.stderr[-3000:]


KILL_POINTS = [(fmt, point) for fmt in FORMATS for point in ("tmp", "published", "torn", "merge")]


@pytest.mark.slow
@pytest.mark.parametrize(("output_format", "point"), [*KILL_POINTS, ("npy-parquet", "npy")])
def test_a_run_killed_at_any_step_of_a_write_resumes_to_the_uninterrupted_folder(
    model, images, whole, tmp_path, output_format, point
):
    out = tmp_path / "out"
    _killed_run(point, [images], out, output_format)
    rows = index_files.read_rows(out).values()
    by_part = Counter(row["shard"] for row in rows if row["status"] == "ok")
    left = {p for p in owned_files(out) if ".tmp" not in p.name}
    named = {p for part in by_part for p in part_files(out, part)}
    resumed = encode([images], out, model=model, resume=True, **_options(output_format))
    _assert_same(out, whole[output_format])
    assert resumed.encoded + resumed.skipped == 6 and resumed.failed == 0
    if point in ("published", "npy"):  # a part file no row names: removed, and the summary says so
        assert left - named and all(any(f"{p}: no index row" in r for r in resumed.repairs) for p in left - named)
    if point == "torn":  # the part whose rows were cut short: removed with the row that made it
        assert any("its rows were cut short" in r for r in resumed.repairs), resumed.repairs


@pytest.mark.slow
@pytest.mark.parametrize("output_format", FORMATS)
def test_a_resume_killed_as_it_settles_the_folder_resumes_again(model, images, whole, tmp_path, output_format):
    out = tmp_path / "out"
    _killed_run("published", [images], out, output_format)
    _killed_run("settle", [images], out, output_format, resume=True)  # the index rewritten, nothing removed yet
    encode([images], out, model=model, resume=True, **_options(output_format))
    _assert_same(out, whole[output_format])


# --------------------------------------------------------------------------------------------------
# keys: one input each, forever, within a folder
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> list[Path]:
    """Eight images, and a tar shard of two more (a unit of several items)."""
    root = tmp_path_factory.mktemp("eight")
    paths = [write_image(root / f"{i:03d}.png", 30 + 9 * i, 40, i) for i in range(8)]
    blobs = [write_image(root / f"m{i}.png", 44, 30 + 7 * i, 20 + i).read_bytes() for i in range(2)]
    paths.append(write_tar(root / "t.tar", [(f"s{i}.png", blob) for i, blob in enumerate(blobs)]))
    return paths


def _keys(out: Path) -> dict[str, str]:
    rows = read_index(out)
    keys = {row["path"]: row["key"] for row in rows}
    assert len(set(keys.values())) == len(rows) == len(keys), rows
    return keys


@pytest.mark.parametrize("output_format", FORMATS)
def test_keys_stay_with_their_inputs_across_resumes_with_other_inputs(model, eight, tmp_path, output_format):
    out, options = tmp_path / "out", dict(model=model, **_options(output_format))
    lists = [
        [eight[0], eight[1], eight[8], eight[2]],  # a tar among files
        [eight[3], eight[2], eight[8], eight[4], eight[3]],  # 0 and 1 removed, 3 and 4 added (3 twice), reordered
        [eight[5], eight[6], eight[7], eight[1], eight[0]],  # only new inputs first, then earlier ones
    ]
    seen: dict[str, str] = {}
    for i, inputs in enumerate(lists):
        encode(inputs, out, resume=i > 0, **options)
        keys = _keys(out)
        assert {path: keys[path] for path in seen} == seen  # an input keeps its key, every earlier input kept
        seen = keys
        by_key = {row["key"]: row["path"] for row in read_index(out)}
        _check_folder(out)
        for part, key, _ in _stored(out):  # what a retrieval join on the key finds is that input
            if part.endswith(".parquet"):
                table = pq.read_table(out / part, columns=["key", "path"]).to_pylist()
                assert {item["key"]: item["path"] for item in table}[key] == by_key[key]
    assert len(seen) == 10


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["safetensors", "npy-parquet"])
def test_keys_stay_unique_when_a_killed_run_is_resumed_with_other_inputs(model, eight, tmp_path, output_format):
    out, options = tmp_path / "out", dict(model=model, **_options(output_format))
    _killed_run("published", eight[:6], out, output_format)
    before = {row["path"]: row["key"] for row in index_files.read_rows(out).values()}
    encode([eight[7], *reversed(eight[:6]), eight[6]], out, resume=True, **options)
    keys = _keys(out)
    assert {path: keys[path] for path in before} == before
    assert len(keys) == 8 and _check_folder(out).keys() == set(keys)


# --------------------------------------------------------------------------------------------------
# a retried failure replaces its row
# --------------------------------------------------------------------------------------------------


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("given", ["file", "dot_slash", "glob", "empty_folder", "list"])
def test_a_fixed_failure_resumed_has_one_ok_row_and_the_summary_agrees(ckpt, tmp_path, monkeypatch, capsys, given):
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    write_image(Path("in/a.png"), 50, 40, 1)
    fixed = Path("in/sub/b.png") if given == "empty_folder" else Path("in/b.png")
    Path("in/sub").mkdir()
    Path("in/list.txt").write_text("a.png\nb.png\n")
    inputs = {
        "file": ["in/a.png", "in/b.png"],
        "dot_slash": ["in/a.png", "./in/b.png"],
        "glob": ["in/a.png", "in/b*.png"],
        "empty_folder": ["in/a.png", "in/sub"],
        "list": ["in/list.txt"],
    }[given]
    run = [*inputs, "--out", "out", "--model", str(ckpt), *SMALL, "--json"]
    assert cli_main(["encode", *run]) == 1
    first = _summary(capsys)
    assert first["failed"] == 1 and len(first["failures"]) == 1

    write_image(fixed, 40, 60, 2)
    assert cli_main(["encode", *run, "--resume"]) == 0
    again = _summary(capsys)
    rows = read_index("out")
    assert [row["status"] for row in rows] == ["ok", "ok"], rows
    assert (again["encoded"], again["skipped"], again["failed"], again["failures"]) == (1, 1, 0, [])
    assert cli_main(["encode", *run, "--out", "whole"]) == 0  # an uninterrupted run of the fixed inputs
    assert _summary(capsys)["encoded"] == 2
    assert without_shard(read_index("out")) == without_shard(read_index("whole"))

    assert cli_main(["encode", *run, "--resume"]) == 0  # nothing left to do: counted from the same index
    third = _summary(capsys)
    assert (third["encoded"], third["skipped"], third["failed"]) == (0, 2, 0)


def test_failures_still_failing_or_not_given_again_are_counted_as_the_index_holds(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", 50, 40, 1)
    write_image(tmp_path / "c.png", 40, 40, 3)
    common = ["--out", "out", "--model", str(ckpt), *SMALL, "--json"]
    assert cli_main(["encode", "a.png", "missing.png", "gone.png", *common]) == 1
    assert _summary(capsys)["failed"] == 2
    # missing.png given again and still missing, gone.png not given, c.png new, missing.png listed twice
    assert cli_main(["encode", "c.png", "./missing.png", "missing.png", "a.png", *common, "--resume"]) == 1
    summary = _summary(capsys)
    rows = {row["path"]: row for row in read_index("out")}
    assert len(rows) == 4 and [row["status"] for row in rows.values()] == ["ok", "failed", "ok", "failed"]
    assert (summary["encoded"], summary["skipped"], summary["failed"]) == (1, 1, 1)
    assert [f["path"] for f in summary["failures"]] == ["missing.png"] and summary["earlier_failures"] == 1

    assert cli_main(["encode", "c.png", "a.png", *common[:-1], "--resume"]) == 0
    text = capsys.readouterr().out
    assert "(0 failed, 2 already done" in text and "failed:" not in text
    assert "2 failed rows of an earlier run's inputs, not given to this run, stay in the index" in text


# --------------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------------


def _fill_the_disk(monkeypatch, output_format: str, seam: str) -> None:
    """From the second write through ``seam`` on, the disk is full: half the bytes land, then ENOSPC."""
    calls = []
    if seam == "write" and output_format == "safetensors":
        fill_the_disk_at_the_second_shard(monkeypatch)
    elif seam == "write":
        real_write = part_formats.write_file

        def write_file(path, data, mode):
            calls.append(path)
            if len(calls) <= (2 if output_format == "npy-parquet" else 1):  # the first part's files
                return real_write(path, data, mode)
            path.write_bytes(b"half a part")
            raise disk_full_error(str(path))

        monkeypatch.setattr(part_formats, "write_file", write_file)
    else:  # "publish": the second name cannot be made (a folder's entry needs a block)
        real_publish = part_formats.publish_new

        def publish_new(tmp, final):
            calls.append(final)
            if len(calls) >= 1 + (output_format == "npy-parquet"):
                raise disk_full_error(str(final))
            return real_publish(tmp, final)

        monkeypatch.setattr(part_formats, "publish_new", publish_new)
        monkeypatch.setattr(shard_files, "publish_new", publish_new)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("hevc-vit encode")]


def _assert_consistent(out: Path) -> None:
    """What a failed run leaves: no temporary file, no partial row, no part without rows, every ok row's part."""
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]
    named = set()
    for index_file in [out / "index.jsonl", *rank_index_files(out)]:
        data = index_file.read_bytes() if index_file.exists() else b""
        assert not data or data.endswith(b"\n"), f"{index_file} ends in a partial row"
        for row in map(json.loads, data.splitlines()):
            if row["status"] == "ok":
                named.update(part_files(out, row["shard"]))
                assert (out / row["shard"]).is_file(), row
    assert set(owned_files(out)) == named


@pytest.mark.parametrize("seam", ["write", "publish"])
@pytest.mark.parametrize("output_format", FORMATS)
def test_a_full_disk_in_any_format_ends_with_one_line_and_resumes(
    images, ckpt, whole, tmp_path, capsys, monkeypatch, output_format, seam
):
    out = tmp_path / "out"
    _fill_the_disk(monkeypatch, output_format, seam)
    assert cli_main(cli_args(images, out, ckpt, *CLI_FORMAT, output_format)) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1, lines
    assert str(out) in lines[0] and " free" in lines[0] and "--resume" in lines[0] and "no space left" in lines[0]
    _assert_consistent(out)
    monkeypatch.undo()  # space was freed
    assert cli_main(cli_args(images, out, ckpt, *CLI_FORMAT, output_format, "--resume")) == 0
    _assert_same(out, whole[output_format])


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_full_disk_raises_one_oserror_from_the_python_api(model, images, whole, tmp_path, monkeypatch, output_format):
    out = tmp_path / "out"
    _fill_the_disk(monkeypatch, output_format, "write")
    with pytest.raises(OSError) as info:
        encode([images], out, model=model, **_options(output_format))
    assert info.value.errno == errno.ENOSPC and str(out) in str(info.value) and "\n" not in str(info.value)
    _assert_consistent(out)
    monkeypatch.undo()
    encode([images], out, model=model, resume=True, **_options(output_format))
    _assert_same(out, whole[output_format])


REAL_DISK = r"""
set -e
mount -t tmpfs -o size={size} tmpfs "$1"
set +e
"$PYTHON" -m hevc_vit encode "$2" --out "$1/out" {args} > "$3/first.out" 2> "$3/first.err"
echo $? > "$3/first.rc"
set -e
ls "$1/out" "$1/out"/* > "$3/first.ls"
mount -o remount,size=64m "$1"
"$PYTHON" -m hevc_vit encode "$2" --out "$1/out" {args} --resume > "$3/second.out" 2> "$3/second.err" || true
cp -a "$1/out" "$3/out"
"""


def _real_full_disk(images: Path, ckpt: Path, tmp_path: Path, output_format: str, size: str) -> Path:
    """The CLI on a ``size`` tmpfs (mounted in a user namespace of its own), then resumed once it is 64 MB."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: cannot mount a small tmpfs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    args = " ".join(cli_args(images, Path("X"), ckpt, *CLI_FORMAT, output_format)[4:])  # from --model on
    script = REAL_DISK.format(size=size, args=args)
    env = {**subprocess_env(), "PYTHON": sys.executable}
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode(errors='replace').strip()}")
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(mount), str(images), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("output_format", FORMATS)
def test_a_real_full_disk_ends_with_one_line_and_resumes(images, ckpt, whole, tmp_path, output_format):
    # room for the settings, the lock, the rank's index and a part or two (a page each at least), not all parts
    size = {"safetensors": "40k", "npy-parquet": "24k", "parquet": "40k"}[output_format]
    result = _real_full_disk(images, ckpt, tmp_path, output_format, size)
    rc, err = (result / "first.rc").read_text().strip(), (result / "first.err").read_text()
    lines = [line for line in err.splitlines() if line.startswith("hevc-vit encode")]
    assert rc == "1" and "Traceback" not in err, err[-3000:]
    assert "rank00000-00000" in (result / "first.ls").read_text()  # the disk filled after a part was written
    assert len(lines) == 1 and "no space left" in lines[0] and "--resume" in lines[0], err[-3000:]
    assert (result / "second.err").read_text().count("hevc-vit encode: error") == 0
    _assert_same(result / "out", whole[output_format])
