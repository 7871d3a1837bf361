"""``hevc-vit encode``: its features against the packing model run directly on the same preprocessed items,
whatever the token budget; bad inputs recorded; interrupted + resumed against uninterrupted; 2-process
torchrun against one process; input expansion on its own; the CLI and its demo default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from hevc_vit import HEVCViTPackingModel, patchify
from hevc_vit.cli import main as cli_main
from hevc_vit.encode import DEFAULT_OUT, EncodeOptions, api, encode, iter_features, read_index, sample_inputs
from hevc_vit.encode.output.folder import choose_out_dir
from hevc_vit.encode.output.index import rank_index_files
from hevc_vit.encode.readers.expand import expand_inputs
from hevc_vit.media.video import read_video, temporal_positions, video_patch_positions
from hevc_vit.packing import grid_positions, unpack
from tests.helpers import (
    FIXTURES,
    assert_close_rel,
    assert_same_output,
    cli_args,
    crash_on_forward,
    features_by_path,
    run_encode_cli,
    without_shard,
    write_image,
)
from tests.helpers.encode import CONTEXT, FRAMES, OPTIONS, PROC
from tests.helpers.media import write_clip


@pytest.fixture(scope="module")
def model() -> HEVCViTPackingModel:
    """The tiny reference checkpoint (hidden 64, 2 heads, 3 layers, patch 14): its weights are perturbed far
    from a fresh init, so a wrong position or a mixed-up item changes the features clearly (a fresh init's
    near-uniform attention would hide both)."""
    return HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Images of several sizes and modes in nested folders, and one clip."""
    root = tmp_path_factory.mktemp("data")
    (root / "b").mkdir()
    write_image(root / "a.png", 70, 42, 0)
    write_image(root / "b" / "c.png", 100, 30, 1)
    write_image(root / "b" / "d.jpg", 300, 200, 2)
    write_image(root / "e.png", 1, 1, 3)
    write_image(root / "f.png", 41, 97, 4, mode="L")
    write_image(root / "g.png", 56, 56, 5)
    write_clip(root / "clip.mp4", 10)
    return root


def _reference(model: HEVCViTPackingModel, paths: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The packing model run directly, in one forward, on the items preprocessed by the same processor."""
    patches, grids, positions = [], [], []
    for path in paths:
        if path.endswith(".mp4"):
            video = read_video(path, FRAMES)
            p, g = patchify(PROC(video.frames)[None], 14)  # (1, C, T, H, W) -> (N, C·p·p)
            pos = video_patch_positions(tuple(g[0].tolist()), temporal_positions(len(video.frames), CONTEXT))
        else:
            with Image.open(path) as image:  # encode's default JPEG draft decode (test_pipeline checks it)
                p, g = patchify(PROC(image, draft=True)[None], 14)
            pos = grid_positions(g)
        patches.append(p)
        grids.append(g)
        positions.append(pos)
    grid = torch.cat(grids)
    with torch.no_grad():
        out = model(torch.cat(patches), grid_thw=grid, patch_positions=torch.cat(positions))
    per_item = unpack(out.last_hidden_state, grid.prod(-1).tolist())
    return {
        path: {"patches": f, "pooled": out.pooler_output[i], "grid_thw": grid[i]}
        for i, (path, f) in enumerate(zip(paths, per_item))
    }


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens, workers", [(24, 0), (60, 2), (100_000, 0)])
def test_encode_equals_packing_model_on_the_same_items(model, data, tmp_path, max_tokens, workers):
    calls: list[tuple[int, int]] = []  # (tokens, items) of every forward
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs["plan"].num_items)), with_kwargs=True
    )
    try:
        result = encode([data], tmp_path / "out", model=model, max_tokens=max_tokens, **{**OPTIONS, "workers": workers})
    finally:
        hook.remove()
    rows = read_index(tmp_path / "out")
    assert [row["status"] for row in rows] == ["ok"] * 7, rows
    assert result.encoded == 7 and result.failed == 0
    expected = _reference(model, [row["path"] for row in rows])
    got = features_by_path(tmp_path / "out")
    for path, ref in expected.items():
        assert torch.equal(got[path]["grid_thw"], ref["grid_thw"])
        assert_close_rel(got[path]["patches"], ref["patches"], what=f"{path} patches")
        assert_close_rel(got[path]["pooled"], ref["pooled"], what=f"{path} pooled")
    # the budget is kept (an item over it runs alone), and a small budget means several forwards
    assert all(tokens <= max_tokens or items == 1 for tokens, items in calls), calls
    assert sum(items for _, items in calls) == 7
    if max_tokens == 100_000:
        assert len(calls) == 1
    else:
        assert len(calls) > 2
    assert result.tokens == sum(int(ref["grid_thw"].prod()) for ref in expected.values())


def test_mean_pooling_and_pooled_only(model, data, tmp_path):
    encode([data / "a.png", data / "clip.mp4"], tmp_path / "out", model=model, pool="mean", pooled_only=True, **OPTIONS)
    rows = read_index(tmp_path / "out")
    expected = _reference(model, [row["path"] for row in rows])
    for row, tensors in iter_features(tmp_path / "out"):
        assert set(tensors) == {"pooled", "grid_thw"} and row["shape"] == [64]
        assert_close_rel(tensors["pooled"], expected[row["path"]]["patches"].mean(0), what=row["path"])


# --------------------------------------------------------------------------------------------------
# bad inputs, resume, overwrite
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_recorded_with_reasons(model, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = write_image(folder / "good.png", 60, 40, 0)
    jpeg = write_image(folder / "corrupt.jpg", 120, 90, 1).read_bytes()
    (folder / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # cut in the middle of the data
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture\n" * 20)
    write_image(folder / "one_pixel.png", 1, 1, 2)
    (folder / ".hidden.png").write_bytes(good.read_bytes())  # hidden names are not inputs
    missing = tmp_path / "missing.png"
    result = encode([folder, missing, tmp_path / "nothing*.png"], tmp_path / "out", model=model, **OPTIONS)
    rows = {Path(row["path"]).name: row for row in read_index(tmp_path / "out")}
    assert set(rows) == {
        "corrupt.jpg",
        "empty.png",
        "good.png",
        "notes.txt",
        "one_pixel.png",
        "missing.png",
        "nothing*.png",
    }
    assert rows["good.png"]["status"] == "ok" and rows["good.png"]["error"] == ""
    assert rows["one_pixel.png"]["status"] == "ok" and rows["one_pixel.png"]["grid_thw"] == [1, 2, 2]  # up to min
    reasons = {
        "corrupt.jpg": "truncated",
        "empty.png": "empty file",
        "notes.txt": "not an image or a video",
        "missing.png": "no such file",
        "nothing*.png": "no file matches",
    }
    for name, reason in reasons.items():
        assert rows[name]["status"] == "failed" and reason in rows[name]["error"], rows[name]
        assert rows[name]["shard"] == ""
    assert result.encoded == 2 and result.failed == 5
    assert "failed: " in result.summary() and "truncated" in result.summary()


def test_interrupted_run_resumed_equals_uninterrupted(model, data, tmp_path):
    options = dict(model=model, max_tokens=24, shard_size_mb=0, **OPTIONS)  # one shard per forward
    with crash_on_forward(model):
        encode([data], tmp_path / "run", **options)
    run = tmp_path / "run"
    kept = read_index(run)  # the index of what the stopped run wrote: partial rows kept, the rank file merged
    assert 0 < len(kept) < 7 and all(row["status"] == "ok" for row in kept) and not rank_index_files(run)
    with pytest.raises(FileExistsError, match="--resume"):
        encode([data], run, **options)
    with pytest.raises(ValueError, match="frames"):
        encode([data], run, resume=True, **{**options, "frames": 2})
    with open(run / "index.rank00000.jsonl", "a") as f:  # as if killed in the middle of appending a row
        f.write('{"path": "x", "sha')
    resumed = encode([data], run, resume=True, **options)
    assert 0 < resumed.skipped < 7 and resumed.encoded == 7 - resumed.skipped

    whole = encode([data], tmp_path / "whole", **options)
    assert whole.skipped == 0
    assert_same_output(run, tmp_path / "whole")
    assert not rank_index_files(run)  # merged, then removed


def test_overwrite_replaces_only_its_own_outputs(model, data, tmp_path):
    out = tmp_path / "out"
    encode([data / "a.png", data / "g.png"], out, model=model, **OPTIONS)
    (out / "notes.md").write_text("mine")
    encode([data / "g.png"], out, model=model, overwrite=True, **OPTIONS)
    assert [Path(r["path"]).name for r in read_index(out)] == ["g.png"]
    assert len(list((out / "shards").iterdir())) == 1 and (out / "notes.md").read_text() == "mine"
    with pytest.raises(ValueError, match="both"):
        encode([data / "g.png"], out, model=model, overwrite=True, resume=True, **OPTIONS)


# --------------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_equal_one_process(model, data, tmp_path):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    PROC.save_pretrained(ckpt)  # the folder's own native processor: picked up by --processor native
    single = encode([data], tmp_path / "single", model=str(ckpt), max_tokens=40, **OPTIONS)
    args = [
        "encode",
        str(data),
        "--out",
        str(tmp_path / "multi"),
        "--model",
        str(ckpt),
        "--frames",
        str(FRAMES),
        "--temporal-context",
        str(CONTEXT),
        "--max-tokens",
        "40",
        "--workers",
        "0",
        "--device",
        "cpu",
        "-q",
    ]
    proc = run_encode_cli(2, args, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "encoded 7 of 7 inputs" in proc.stdout
    rows_multi, rows_single = read_index(tmp_path / "multi"), read_index(tmp_path / "single")
    assert without_shard(rows_multi) == without_shard(rows_single)
    assert {row["shard"].split("-")[0] for row in rows_multi} == {"shards/rank00000", "shards/rank00001"}
    stored = [key for shard in (tmp_path / "multi" / "shards").iterdir() for key in safe_open(shard, "pt").keys()]
    assert sorted(k for k in stored if k.endswith(".patches")) == [f"{i:08d}.patches" for i in range(7)]  # once each
    a, b = features_by_path(tmp_path / "multi"), features_by_path(tmp_path / "single")
    assert a.keys() == b.keys() == {row["path"] for row in rows_single}
    for path in a:
        for name in ("patches", "pooled", "grid_thw"):
            assert_close_rel(a[path][name].float(), b[path][name].float(), what=f"{path} {name}")
    assert single.skipped == 0 and single.encoded == 7


# --------------------------------------------------------------------------------------------------
# the inputs on their own (the packer: tests/encode/model/test_batching.py)
# --------------------------------------------------------------------------------------------------


def test_expand_inputs_folders_globs_lists(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for name in ("x/b.png", "x/a.png", "x/y/c.png", "x/.hidden", "z.png"):
        (tmp_path / name).write_bytes(b"1")
    (tmp_path / "list.txt").write_text("# a comment\nz.png\n\nx/a.png\n")
    specs = expand_inputs([tmp_path / "x", str(tmp_path / "*.png"), tmp_path / "list.txt", tmp_path / "none.png"])
    names = [(Path(s.path).relative_to(tmp_path).as_posix() if not s.error else s.path, s.error) for s in specs]
    assert names == [
        ("x/a.png", ""),
        ("x/b.png", ""),
        ("x/y/c.png", ""),
        ("z.png", ""),
        (str(tmp_path / "none.png"), "no such file or folder"),
    ]


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def test_cli_refuses_an_existing_folder_and_reports_errors(model, data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    args = cli_args(data / "a.png", tmp_path / "out", ckpt)
    assert cli_main(args) == 0
    assert str((tmp_path / "out").resolve()) in capsys.readouterr().out
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--resume" in err and "--overwrite" in err
    assert cli_main(cli_args(data / "a.png", tmp_path / "out", tmp_path / "nope", "--resume")) == 2
    assert "neither a preset" in capsys.readouterr().err


@pytest.mark.video  # decodes a clip with PyAV
def test_cli_demo_default_encodes_the_shipped_samples(tmp_path, monkeypatch, capsys):
    """The README's first command: no arguments at all."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["encode", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "random" in captured.err and "--model" in captured.err
    out_dir = tmp_path / DEFAULT_OUT
    assert str(out_dir.resolve()) in captured.out
    rows = read_index(out_dir)
    assert len(rows) == len(sample_inputs()) >= 4
    assert {row["kind"] for row in rows} == {"image", "video"} and all(row["status"] == "ok" for row in rows)
    # a second run must not touch the first: it gets the next numbered folder
    assert choose_out_dir(None, resume=False, overwrite=False, log=lambda m: None) == Path(f"{DEFAULT_OUT}-2")
    assert json.loads((out_dir / "encode_config.json").read_text())["model"].startswith("preset:small")


# --------------------------------------------------------------------------------------------------
# engine choice
# --------------------------------------------------------------------------------------------------


def _engines(monkeypatch) -> list[tuple[str, object, object, EncodeOptions]]:
    """Both engines' entries replaced by recorders (nothing runs, no Ray starts); the calls made."""
    calls = []

    def recorder(name):
        def entry(inputs, out_dir, options):
            calls.append((name, inputs, out_dir, options))
            return name

        return entry

    monkeypatch.setattr(api, "encode_local", recorder("local"))
    monkeypatch.setattr(api, "encode_folder", recorder("ray"))
    return calls


@pytest.mark.parametrize("engine", ["ray", "local"])
def test_encode_hands_the_run_to_the_engine_the_options_name(monkeypatch, tmp_path, engine):
    calls = _engines(monkeypatch)
    base = EncodeOptions(max_tokens=512)
    assert encode(["a.png"], tmp_path / "out", base, engine=engine, frames=6) == engine
    ((name, inputs, out_dir, options),) = calls
    assert (name, inputs, out_dir) == (engine, ["a.png"], tmp_path / "out")
    assert (options.engine, options.max_tokens, options.video_frames) == (engine, 512, 6)  # overrides on top


def test_encode_refuses_bad_options_before_any_engine(monkeypatch, tmp_path):
    calls = _engines(monkeypatch)
    with pytest.raises(TypeError, match="expected an EncodeOptions"):
        encode(["a.png"], tmp_path / "out", {"engine": "ray"})
    with pytest.raises(ValueError):
        encode(["a.png"], tmp_path / "out", engine="nope")
    assert calls == []
