"""``hevc-vit encode`` against hostile use: two runs on one folder, damaged folders, other weights on resume,
NaN configs and features, inputs that could vanish, lying files, bad options. Each test fails on a version
without the guarantee it names (see the README's reliability section)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hevc_vit import HEVCViTPackingModel
from hevc_vit.cli import main as cli_main
from hevc_vit.encode import encode, iter_features, load_features, read_index
from hevc_vit.encode.output.lock import FolderLock
from hevc_vit.encode.readers.expand import expand_inputs
from tests.helpers import assert_close_rel, cli_args, features_by_path, run_encode_cli, without_shard, write_image
from tests.helpers.encode import OPTIONS, PROC
from tests.helpers.media import noisy_clip

# --------------------------------------------------------------------------------------------------
# one folder, one run
# --------------------------------------------------------------------------------------------------


def test_two_runs_started_together_into_one_folder_one_is_refused(ckpt, images, tmp_path):
    """Both start at one instant; loading the checkpoint from its folder takes a while, the window in which both
    would pass a "folder not empty" check made before it."""
    out = tmp_path / "shared"
    start = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = encode([images], out, model=str(ckpt), max_tokens=40, shard_size_mb=0, **OPTIONS)
        except Exception as e:  # noqa: BLE001 - the outcome is what the test looks at
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(refused) == 1, outcomes
    assert isinstance(refused[0], FileExistsError) and "in use by another hevc-vit encode run" in str(refused[0])
    assert f"pid {os.getpid()}" in str(refused[0])

    single = encode([images], tmp_path / "single", model=str(ckpt), max_tokens=40, shard_size_mb=0, **OPTIONS)
    assert single.encoded == 6
    rows = read_index(out)
    assert [r["status"] for r in rows] == ["ok"] * 6
    assert without_shard(rows) == without_shard(read_index(tmp_path / "single"))
    got, want = features_by_path(out), features_by_path(tmp_path / "single")
    assert got.keys() == want.keys()
    for path in want:
        for name in ("patches", "pooled", "grid_thw"):
            assert torch.equal(got[path][name], want[path][name]), f"{path} {name}"
    assert not (out / ".encode.lock").exists()  # the lock goes with the run


def test_a_held_folder_is_refused_by_the_cli_naming_the_holder(images, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    with FolderLock.acquire(out):
        assert cli_main(cli_args(images, out, ckpt)) == 2
        err = capsys.readouterr().err
        assert "in use by another hevc-vit encode run" in err and f"pid {os.getpid()}" in err
        assert [p.name for p in out.iterdir()] == [".encode.lock"]  # the refused run wrote nothing
        assert cli_main(cli_args(images, out, ckpt, "--resume")) == 2  # not even to continue it
    assert not out.exists()  # the lock made the folder; nothing else was written, so it is gone
    assert cli_main(cli_args(images, out, ckpt)) == 0  # once released, the folder is free
    assert [r["status"] for r in read_index(out)] == ["ok"] * 6


def test_without_out_a_second_run_takes_the_next_numbered_folder(tmp_path, monkeypatch):
    from hevc_vit.encode import DEFAULT_OUT
    from hevc_vit.encode.output.folder import claim_out_dir

    monkeypatch.chdir(tmp_path)
    with FolderLock.acquire(DEFAULT_OUT):  # a run that has not written anything yet
        second = claim_out_dir(None, resume=False, overwrite=False, log=lambda m: None)
        assert second.folder == Path(f"{DEFAULT_OUT}-2")
        second.release()
        with pytest.raises(FileExistsError, match="in use"):  # --resume means this folder: no moving on
            claim_out_dir(None, resume=True, overwrite=False, log=lambda m: None)


def test_a_shard_is_never_written_over_an_existing_file(tmp_path, monkeypatch):
    """Another writer creates the shard's name between the writer's check and its rename: the other file stays."""
    import safetensors.torch

    from hevc_vit.encode.output.shards import ShardWriter

    writer = ShardWriter(tmp_path, rank=0, shard_bytes=1 << 30)
    real_save = safetensors.torch.save_file

    def save_then_race(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        (tmp_path / "shards" / "rank00000-00000.safetensors").write_bytes(b"another run's shard")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_race)
    writer.add({"path": "x.png", "key": "00000000"}, {"grid_thw": torch.tensor([1, 2, 2])})
    with pytest.raises(FileExistsError, match="another process is writing"):
        writer.close()
    assert (tmp_path / "shards" / "rank00000-00000.safetensors").read_bytes() == b"another run's shard"
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["rank00000-00000.safetensors"]  # no temp left


# --------------------------------------------------------------------------------------------------
# reading back, resume
# --------------------------------------------------------------------------------------------------


def test_a_row_whose_key_is_missing_from_its_shard_raises(model, images, tmp_path):
    out = tmp_path / "out"
    encode([images / "0.png", images / "1.png"], out, model=model, **OPTIONS)
    rows = read_index(out)
    shard = out / rows[1]["shard"]
    with safe_open(shard, "pt") as f:  # the shard as if another run had replaced it: row 1's key is gone
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(rows[1]["key"] + ".")}
    save_file(kept, str(shard))
    assert load_features(out, rows[0])["patches"].shape[0] == rows[0]["shape"][0]
    for read in (lambda: load_features(out, rows[1]), lambda: list(iter_features(out))):
        with pytest.raises(KeyError) as info:
            read()
        message = str(info.value)
        assert rows[1]["path"] in message and rows[1]["key"] in message and str(shard) in message


def test_resume_refuses_other_weights_saved_at_the_same_path(model, images, tmp_path):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    out = tmp_path / "out"
    encode([images / "0.png"], out, model=str(ckpt), **OPTIONS)
    encode([images / "0.png", images / "1.png"], out, model=str(ckpt), resume=True, **OPTIONS)  # same weights

    other = HEVCViTPackingModel.from_pretrained(ckpt)
    with torch.no_grad():
        other.layernorm_post.weight.mul_(1.5)  # a fine-tune: same names, shapes and architecture
    other.save_pretrained(ckpt)
    with pytest.raises(ValueError, match="weights: earlier 'sha256:"):
        encode([images], out, model=str(ckpt), resume=True, **OPTIONS)
    assert [Path(r["path"]).name for r in read_index(out)] == ["0.png", "1.png"]  # nothing mixed in
    assert json.loads((out / "encode_config.json").read_text())["weights"].startswith("sha256:")


# --------------------------------------------------------------------------------------------------
# non-finite numbers
# --------------------------------------------------------------------------------------------------


def test_a_checkpoint_processor_config_with_nan_is_refused_before_anything_is_written(model, images, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    config = {**PROC.to_dict(), "image_std": [0.5, float("nan"), 0.5]}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(config))  # used automatically with --model ckpt
    out = tmp_path / "out"
    assert cli_main(cli_args(images, out, ckpt)) == 2
    assert "image_std=[0.5, nan, 0.5]" in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_features_give_a_failed_row_never_ok(model, images, tmp_path):
    """The first item of every forward gets a NaN token (as a broken kernel or an overflow would)."""

    def poison_first_item(module, args, kwargs, output):
        output.last_hidden_state[0, 0] = float("nan")

    hook = model.register_forward_hook(poison_first_item, with_kwargs=True)
    try:
        result = encode([images], tmp_path / "out", model=model, max_tokens=100_000, **OPTIONS)  # one forward
    finally:
        hook.remove()
    rows = read_index(tmp_path / "out")
    assert [r["status"] for r in rows] == ["failed"] + ["ok"] * 5
    assert "non-finite" in rows[0]["error"] and rows[0]["shard"] == ""
    assert result.encoded == 5 and result.failed == 1
    assert all(torch.isfinite(t["patches"]).all() for _, t in iter_features(tmp_path / "out"))


# --------------------------------------------------------------------------------------------------
# inputs never vanish
# --------------------------------------------------------------------------------------------------


def test_inputs_that_cannot_be_walked_get_rows_and_linked_folders_are_followed(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "locked").mkdir()
    (root / "locked" / "x.png").write_bytes(b"1")
    (root / "real" / "a.png").write_bytes(b"1")
    (root / "linked").symlink_to(root / "real" / "..")  # a loop: the link leads back to root
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.png").write_bytes(b"1")
    (root / "outside").symlink_to(tmp_path / "other")  # a linked folder outside the tree: followed
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / ".x.png").write_bytes(b"1")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n")

    real_scandir = os.scandir
    refused = {str(root / "locked"), str(tmp_path / "unreadable")}

    def scandir(path="."):  # tests run as root, where permissions are not enforced: refuse like chmod 000
        if os.fspath(path) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    given = [root, tmp_path / "empty", tmp_path / "only_hidden", tmp_path / "unreadable", tmp_path / "empty.txt"]
    specs = {Path(s.path).relative_to(tmp_path).as_posix(): s.error for s in expand_inputs(given)}
    assert specs.keys() == {
        "root/outside/b.png",
        "root/real/a.png",
        "root/linked",
        "root/locked",
        "empty",
        "only_hidden",
        "unreadable",
        "empty.txt",
    }
    assert specs["root/outside/b.png"] == specs["root/real/a.png"] == ""
    assert "already searched" in specs["root/linked"]
    assert "cannot read this folder" in specs["root/locked"] and "Permission denied" in specs["root/locked"]
    assert "cannot read this folder" in specs["unreadable"]
    assert "no files in this folder" in specs["empty"] and "no files in this folder" in specs["only_hidden"]
    assert "names no paths" in specs["empty.txt"]


def test_an_empty_folder_as_the_only_input_exits_2_and_leaves_no_folder(ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(cli_args(tmp_path / "empty", tmp_path / "out", ckpt)) == 2
    captured = capsys.readouterr().err
    assert "nothing to encode" in captured and "no files in this folder" in captured
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("as_path", [False, True])
def test_one_path_as_a_string_or_path_is_one_input(model, images, tmp_path, monkeypatch, as_path):
    monkeypatch.chdir(images)  # a string iterated would give '.', walking this folder of unrelated images
    result = encode(Path("2.png") if as_path else "2.png", tmp_path / "out", model=model, **OPTIONS)
    assert [r["path"] for r in read_index(tmp_path / "out")] == ["2.png"] and result.encoded == 1


def test_truncated_video_gets_a_failed_row(model, tmp_path):

    whole = noisy_clip(tmp_path / "whole.mp4", 40)
    (tmp_path / "cut.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    encode([tmp_path / "whole.mp4", tmp_path / "cut.mp4"], tmp_path / "out", model=model, **OPTIONS)
    rows = {Path(r["path"]).name: r for r in read_index(tmp_path / "out")}
    assert rows["whole.mp4"]["status"] == "ok" and rows["whole.mp4"]["total_frames"] == 40
    assert rows["cut.mp4"]["status"] == "failed" and "truncated" in rows["cut.mp4"]["error"]


# --------------------------------------------------------------------------------------------------
# overwrite, output inside an input, file modes
# --------------------------------------------------------------------------------------------------


def test_overwrite_spares_user_files_with_similar_names(model, images, tmp_path):
    out = tmp_path / "out"
    encode([images / "0.png"], out, model=model, **OPTIONS)
    mine = [
        out / "shards" / "ranking_results.safetensors",
        out / "shards" / "rank_notes.safetensors.bak",
        out / "index.jsonl.notes",
    ]
    for path in mine:
        path.write_bytes(b"the user's")
    encode([images / "1.png"], out, model=model, overwrite=True, **OPTIONS)
    assert all(path.read_bytes() == b"the user's" for path in mine)
    assert [Path(r["path"]).name for r in read_index(out)] == ["1.png"]
    assert sorted(p.name for p in (out / "shards").iterdir() if p.name.startswith("rank0")) == [
        "rank00000-00000.safetensors"
    ]


def test_an_output_folder_inside_an_input_folder_is_not_an_input(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_image(folder / "a.png", 60, 40, 0)
    encode([folder], folder / "feats", model=model, **OPTIONS)
    encode([folder], folder / "feats", model=model, overwrite=True, **OPTIONS)  # its own shards are not inputs
    assert [Path(r["path"]).name for r in read_index(folder / "feats")] == ["a.png"]


def test_shards_get_the_process_file_mode(model, images, tmp_path):
    old = os.umask(0o022)
    try:
        encode([images / "0.png"], tmp_path / "out", model=model, **OPTIONS)
    finally:
        os.umask(old)
    shard = next((tmp_path / "out" / "shards").iterdir())
    assert oct(shard.stat().st_mode & 0o777) == oct(0o644)


# --------------------------------------------------------------------------------------------------
# bad options, odd names
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shard-size-mb", "nan"], "argument --shard-size-mb: 'nan'"),
        (["--shard-size-mb", "inf"], "argument --shard-size-mb: 'inf'"),
        (["--shard-size-mb", "-1"], "argument --shard-size-mb: '-1'"),
        (["--device", "foo"], "device='foo'; expected 'cpu', 'cuda'"),
        (["--device", "meta"], "device='meta'"),
        (["--frames", "0"], "argument --frames: '0'"),
    ],
)
def test_bad_option_values_exit_2_and_leave_no_files(images, ckpt, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    try:  # a number out of its range stops the parser; other values are refused before the run
        status = cli_main(cli_args(images, out, ckpt, *extra))
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_invalid_resample_in_a_processor_file_exits_2(images, ckpt, tmp_path, capsys):
    """Refused after the folder was taken (the processor is built with the model): what the lock made goes too."""
    (tmp_path / "proc.json").write_text(json.dumps({**PROC.to_dict(), "resample": 42}))
    out = tmp_path / "new" / "nested" / "out"
    assert cli_main(cli_args(images, out, ckpt, "--processor", str(tmp_path / "proc.json"))) == 2
    assert "resample=42" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_non_utf8_list_file_and_non_utf8_names_are_reported_safely(ckpt, images, tmp_path, capsysbinary):
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8: held by Python as a surrogate escape
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / odd).write_bytes((images / "0.png").read_bytes())
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"caf\xe9.png\n")
    args = cli_args([folder, listing], tmp_path / "out", ckpt)
    assert cli_main(args) == 1  # two inputs failed
    out = capsysbinary.readouterr().out.decode("utf-8")  # printable: the odd byte shown as \xff
    assert "bad\\xff.png" in out and "not UTF-8" in out and str(listing) in out
    rows = {r["path"]: r for r in read_index(tmp_path / "out")}
    assert rows[str(folder / odd)]["status"] == "ok"  # the index keeps the exact name: it opens again
    assert "list file" in rows[str(listing)]["error"] and str(listing) in rows[str(listing)]["error"]


# --------------------------------------------------------------------------------------------------
# resume against an uninterrupted run
# --------------------------------------------------------------------------------------------------


def test_pooled_vectors_depend_on_the_forward_only_within_the_documented_bound(model, images, tmp_path):
    """Each item alone in its forward against all in one forward: patch features, and pooled vectors within
    the float32 row of the tolerance table (the pooling head's matrix products depend on how many items a
    forward holds; that is all resume can change)."""
    alone = encode([images], tmp_path / "alone", model=model, max_tokens=1, **OPTIONS)  # one item per forward
    packed = encode([images], tmp_path / "packed", model=model, max_tokens=100_000, **OPTIONS)
    assert alone.encoded == packed.encoded == 6
    a, b = features_by_path(tmp_path / "alone"), features_by_path(tmp_path / "packed")
    for path in a:
        assert_close_rel(a[path]["patches"], b[path]["patches"], what=f"{path} patches")
        assert_close_rel(a[path]["pooled"], b[path]["pooled"], what=f"{path} pooled")


# --------------------------------------------------------------------------------------------------
# a decoding worker that dies
# --------------------------------------------------------------------------------------------------


def test_a_worker_that_dies_fails_only_its_input(model, images, tmp_path, monkeypatch):
    """The decoder crashes its process (os._exit, as an OOM kill or a segfault would) on one file; the run goes
    on and that file alone gets a failed row. Worker processes fork, so they see this patch."""
    import hevc_vit.encode.decode.load

    real_open = hevc_vit.encode.decode.load.open_image

    def crash_on_3(path):
        if Path(path).name == "3.png":
            os._exit(7)
        return real_open(path)

    monkeypatch.setattr(hevc_vit.encode.decode.load, "open_image", crash_on_3)
    result = encode([images], tmp_path / "out", model=model, **{**OPTIONS, "workers": 2})
    rows = {Path(r["path"]).name: r for r in read_index(tmp_path / "out")}
    assert [name for name, r in rows.items() if r["status"] != "ok"] == ["3.png"]
    assert "worker process exited with code 7" in rows["3.png"]["error"]
    assert result.encoded == 5 and result.failed == 1
    resumed = encode([images], tmp_path / "out", model=model, resume=True, **{**OPTIONS, "workers": 2})
    assert resumed.skipped == 5 and resumed.failed == 1  # --resume is not stopped by the same file forever


def test_a_worker_stuck_on_an_input_is_ended_and_the_run_goes_on(model, images, tmp_path, monkeypatch):
    """The decoder never returns on one file (a decoder stuck in C code, a hung mount): after --decode-timeout its
    worker is killed, that file gets a failed row with the reason, every other file is encoded and the run ends;
    --resume then tries that file again (a timeout may pass) and it fails the same way."""
    import time

    import hevc_vit.encode.decode.load

    real_open = hevc_vit.encode.decode.load.open_image

    def hang_on_3(path):
        if Path(path).name == "3.png":
            while True:
                time.sleep(3600)
        return real_open(path)

    monkeypatch.setattr(hevc_vit.encode.decode.load, "open_image", hang_on_3)
    options = {**OPTIONS, "workers": 2, "decode_timeout": 1.5}
    result = encode([images], tmp_path / "out", model=model, **options)
    rows = {Path(r["path"]).name: r for r in read_index(tmp_path / "out")}
    assert [name for name, r in rows.items() if r["status"] != "ok"] == ["3.png"]
    assert rows["3.png"]["error"].startswith("TimeoutError: loading this input took longer than 1.5 s")
    assert result.encoded == 5 and result.failed == 1
    resumed = encode([images], tmp_path / "out", model=model, resume=True, **options)
    assert resumed.skipped == 5 and resumed.failed == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_ranks_share_the_folder_and_a_held_folder_stops_every_rank(images, ckpt, tmp_path):
    """Rank 0 holds the lock for its run (the other ranks write their own files under it); a run whose rank 0
    is refused stops on every rank, none waiting forever, and writes nothing."""
    import subprocess

    def torchrun(out: Path) -> subprocess.CompletedProcess:
        return run_encode_cli(2, [*cli_args(images, out, ckpt), "--device", "cpu"], timeout=180)

    with FolderLock.acquire(tmp_path / "held"):
        refused = torchrun(tmp_path / "held")
        assert refused.returncode != 0 and "in use by another hevc-vit encode run" in refused.stderr
        assert [p.name for p in (tmp_path / "held").iterdir()] == [".encode.lock"]
    done = torchrun(tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = read_index(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"] * 6
    assert {r["shard"].split("-")[0] for r in rows} == {"shards/rank00000", "shards/rank00001"}
    assert not (tmp_path / "out" / ".encode.lock").exists()
