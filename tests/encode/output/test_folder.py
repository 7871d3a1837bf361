"""``hevc-vit encode`` when the disk fills up and when ``--resume`` meets a damaged folder.

A full disk is simulated through the documented write seams (``hevc_vit.encode.output.shards.save_shard``,
``hevc_vit.encode.output.index.append_rows``, ``hevc_vit.encode.output.index.write_index``): each write there fails with
``ENOSPC`` after leaving half its bytes, as a real full disk does. Each test compares the folder that is
left, resumed, with an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hevc_vit.cli import main as cli_main
from hevc_vit.encode import encode, read_index
from hevc_vit.encode.output import index as index_files
from hevc_vit.encode.output.index import rank_index_files
from tests.helpers import (
    assert_close_rel,
    assert_same_output,
    cli_args,
    crash_on_forward,
    disk_full_error,
    features_by_path,
    fill_the_disk_at_the_second_shard,
)
from tests.helpers.encode import OPTIONS

SEVERAL_SHARDS = ("--shard-size-mb", "0", "--max-tokens", "40")  # one shard per forward, several forwards


@pytest.fixture(scope="module")
def uninterrupted(images, ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert cli_main(cli_args(images, out, ckpt, *SEVERAL_SHARDS)) == 0
    return out


def _error_lines(capsys) -> list[str]:
    """The command's own lines on stderr (transformers prints a loading bar there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("hevc-vit encode")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------------


def _fill_the_disk(monkeypatch, seam: str) -> None:
    """From the second write through ``seam`` on, the disk is full: half the bytes land, then ENOSPC."""
    calls = []
    if seam == "shard":
        fill_the_disk_at_the_second_shard(monkeypatch)
    elif seam == "rows":
        real_append = index_files.append_rows

        def append_rows(fd, rows):
            calls.append(rows)
            if len(calls) == 1:
                return real_append(fd, rows)
            os.write(fd, index_files.rows_bytes(rows)[:20])
            raise disk_full_error("index.rank00000.jsonl")

        monkeypatch.setattr(index_files, "append_rows", append_rows)
    else:

        def write_index(path, rows):
            raise disk_full_error(str(path))

        monkeypatch.setattr(index_files, "write_index", write_index)


@pytest.mark.parametrize("seam", ["shard", "rows", "index"])
def test_a_full_disk_ends_the_run_with_one_line_and_resume_continues(
    images, ckpt, uninterrupted, tmp_path, capsys, monkeypatch, seam
):
    out = tmp_path / "out"
    _fill_the_disk(monkeypatch, seam)
    assert cli_main(cli_args(images, out, ckpt, *SEVERAL_SHARDS)) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1, lines
    assert str(out) in lines[0] and " free" in lines[0] and "--resume" in lines[0] and "no space left" in lines[0]

    # what is left is consistent: no temporary file, no partial row, every ok row names a shard that exists
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]
    for index_file in [out / "index.jsonl", *rank_index_files(out)]:
        data = index_file.read_bytes() if index_file.exists() else b""
        assert not data or data.endswith(b"\n"), f"{index_file} ends in a partial row"
        for line in data.splitlines():
            row = json.loads(line)
            assert row["status"] != "ok" or (out / row["shard"]).is_file(), row

    monkeypatch.undo()  # space was freed
    assert cli_main(cli_args(images, out, ckpt, *SEVERAL_SHARDS, "--resume")) == 0
    assert_same_output(out, uninterrupted)


def test_a_full_disk_raises_an_oserror_from_the_python_api(model, images, tmp_path, monkeypatch):
    _fill_the_disk(monkeypatch, "shard")
    with pytest.raises(OSError) as info:
        encode([images], tmp_path / "out", model=model, max_tokens=40, shard_size_mb=0, **OPTIONS)
    assert info.value.errno == errno.ENOSPC and str(tmp_path / "out") in str(info.value)


# --------------------------------------------------------------------------------------------------
# --resume on a damaged folder
# --------------------------------------------------------------------------------------------------


def _damage(out: Path, what: str) -> tuple[list[str], Path | None]:
    """Damage ``out`` as a disk error or a stray process could; returns what the refusal must say and the file
    the advice is about."""
    rows = read_index(out)
    if what == "config":
        (out / "encode_config.json").write_text('{"model": "tru')
        return ["encode_config.json is damaged", "not JSON", "--overwrite"], None
    if what == "index_line":
        lines = (out / "index.jsonl").read_text().splitlines(keepends=True)
        lines[1] = lines[1][:30] + "\n"  # a line in the middle, garbled
        (out / "index.jsonl").write_text("".join(lines))
        return [f"{out / 'index.jsonl'}:2 is not a JSON row", "Delete that line", "--overwrite"], out / "index.jsonl"
    shard = out / rows[0]["shard"]
    if what == "shard_garbled":
        shard.write_bytes(b"\x00garbage" * 64)
        return [f"{shard} cannot be read", "Delete that file, then rerun with --resume"], shard
    with safe_open(shard, "pt") as f:  # "shard_key": the shard lacks a row's tensors
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(rows[0]["key"] + ".")}
    save_file(kept, str(shard))
    return [f"{shard} does not hold the features of 1 ok row", rows[0]["path"], "Delete that file"], shard


def _follow_the_advice(out: Path, what: str, damaged: Path | None) -> list[str]:
    """Do what the message said; returns the arguments to run with."""
    if what == "config":
        return ["--overwrite"]
    if what == "index_line":
        lines = damaged.read_text().splitlines(keepends=True)
        damaged.write_text("".join(lines[:1] + lines[2:]))
        return ["--resume"]
    damaged.unlink()
    return ["--resume"]


@pytest.mark.parametrize("what", ["config", "index_line", "shard_garbled", "shard_key"])
def test_resume_on_a_damaged_folder_says_what_and_what_to_do(images, ckpt, uninterrupted, tmp_path, capsys, what):
    out = tmp_path / "out"
    assert cli_main(cli_args(images, out, ckpt, *SEVERAL_SHARDS)) == 0
    expected, damaged = _damage(out, what)
    before = _snapshot(out)
    capsys.readouterr()
    assert cli_main(cli_args(images, out, ckpt, *SEVERAL_SHARDS, "--resume")) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and all(text in lines[0] for text in expected), (lines, expected)
    assert _snapshot(out) == before  # refused before anything was written

    assert cli_main(cli_args(images, out, ckpt, *SEVERAL_SHARDS, *_follow_the_advice(out, what, damaged))) == 0
    assert_same_output(out, uninterrupted)
    if what.startswith("shard"):  # the deleted shard's inputs were encoded again, and the summary says so
        assert f"repaired: {damaged}: missing" in capsys.readouterr().out


def test_resume_repairs_a_torn_last_row_and_a_missing_shard_and_says_so(model, images, uninterrupted, tmp_path):
    options = dict(model=model, max_tokens=40, shard_size_mb=0, **OPTIONS)
    with crash_on_forward(model):
        encode([images], tmp_path / "out", **options)
    out = tmp_path / "out"
    (out / "index.jsonl").rename(out / "index.rank00000.jsonl")  # as kill -9 leaves it: rows in the rank file only
    rank_file = rank_index_files(out)[0]
    rows = [json.loads(line) for line in rank_file.read_text().splitlines()]
    (out / rows[0]["shard"]).unlink()  # a shard lost after its rows were written
    with open(rank_file, "a") as f:  # as if killed in the middle of appending a row
        f.write('{"path": "x", "sha')

    resumed = encode([images], out, resume=True, **options)
    assert resumed.encoded + resumed.skipped == 6 and resumed.failed == 0
    assert any("dropped a last line cut short" in r and rank_file.name in r for r in resumed.repairs)
    assert any(rows[0]["shard"] in r and "missing" in r for r in resumed.repairs)
    assert "repaired:" in resumed.summary()
    assert [r["status"] for r in read_index(out)] == ["ok"] * 6
    got, want = features_by_path(out), features_by_path(uninterrupted)
    assert got.keys() == want.keys()
    for path in want:
        assert_close_rel(got[path]["patches"], want[path]["patches"], what=path)
        assert torch.equal(got[path]["grid_thw"], want[path]["grid_thw"])


def test_resume_accepts_a_folder_written_before_newer_options_existed(model, images, tmp_path):
    """encode_config.json of an older version lacks the options added since: they count as their defaults."""
    out = tmp_path / "out"
    encode([images / "0.png"], out, model=model, **OPTIONS)
    config_path = out / index_files.ENCODE_CONFIG_NAME
    config = json.loads(config_path.read_text())
    for newer in ("output_format", "storage_dtype", "codec_sparse", "codec_budget"):
        del config[newer]
    config_path.write_text(json.dumps(config))
    result = encode([images / "0.png", images / "1.png"], out, model=model, resume=True, **OPTIONS)
    assert (result.encoded, result.skipped) == (1, 1)
