"""Codec-aligned patch selection: the pure functions on handmade inputs, recall of known motion on synthetic
clips made here with PyAV (against random and uniform-frame controls at the same budget), exactness of the
sparse packing path against ``HEVCViTModel(visible_indices=...)``, the preview, and bad input."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit import HEVCViTModel, HEVCViTPackingModel, patchify
from hevc_vit.cli.codec import register as register_cli
from hevc_vit.codec import (
    CodecSparseConfig,
    aligned_difference,
    default_preprocess,
    encode_selection,
    gather_selected_patches,
    global_shift,
    mv_grid,
    render_preview,
    sample_frame_ids,
    select_patches,
    select_topk,
)
from hevc_vit.media.video import temporal_positions, video_patch_positions
from tests.helpers import assert_close_rel, tiny_config
from tests.helpers.codec_clips import ENCODERS, FRAMES, GRID, P, square_patches, write_moving_clip

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

# mpeg4 at 1 Mb/s: at FFmpeg's default 200 kb/s a 5 px/frame pan of pure random texture is mostly artefacts
MOTIONS = {"square": (0, 0), "pan": (3, 4)}  # camera pan in px/frame (down, right)

pytestmark = pytest.mark.video  # PyAV encodes and decodes the clips


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except ValueError:  # UnknownCodecError: a wheel built without it
        return False
    return True


def recall(positions: np.ndarray, truth: np.ndarray) -> float:
    """The fraction of the square's patches in frames t >= 1 that ``positions`` keep (t = 0 is kept by rule)."""
    keep = np.zeros_like(truth)
    keep[tuple(np.asarray(positions).T)] = True
    return float((keep & truth)[1:].sum() / truth[1:].sum())


def random_positions(T: int, K: int, seed: int = 0) -> np.ndarray:
    """Control: the first frame whole, then random patches."""
    S = GRID * GRID
    rest = np.random.default_rng(seed).choice(np.arange(S, T * S), K - S, replace=False)
    return np.argwhere(np.isin(np.arange(T * S), np.r_[np.arange(S), rest]).reshape(T, GRID, GRID))


def uniform_frame_positions(T: int, K: int) -> np.ndarray:
    """Control: whole frames at evenly spaced t (first included), the last one truncated to reach K."""
    S = GRID * GRID
    frames = np.linspace(0, T - 1, -(-K // S)).astype(int)
    flat = (frames[:, None] * S + np.arange(S)).reshape(-1)[:K]
    keep = np.zeros(T * S, bool)
    keep[flat] = True
    return np.argwhere(keep.reshape(T, GRID, GRID))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Clips written once per module on first use: ``clips(codec, motion) -> (path, boxes)``."""
    folder, made = tmp_path_factory.mktemp("codec_clips"), {}

    def get(codec: str, motion: str = "square"):
        if not _has_encoder(codec):
            pytest.skip(f"this PyAV build has no {codec} encoder")
        if (codec, motion) not in made:
            path = folder / f"{motion}_{codec}.mp4"
            boxes = write_moving_clip(path, codec, pan=MOTIONS.get(motion, (0, 0)), moving=motion != "static")
            made[codec, motion] = (path, boxes)
        return made[codec, motion]

    return get


# --------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------


def test_sample_frame_ids_span_the_clip_and_take_all_of_a_short_one():
    assert sample_frame_ids(64, 8).tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert sample_frame_ids(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert sample_frame_ids(100, 1).tolist() == [0]
    with pytest.raises(ValueError, match="frames=0"):
        sample_frame_ids(10, 0)


def _blocky(shape, seed=0, block=8):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (shape[0] // block + 1, shape[1] // block + 1)).astype(np.float32)
    return np.kron(coarse, np.ones((block, block), np.float32))[: shape[0], : shape[1]]


def test_global_shift_finds_the_camera_not_the_moving_object():
    scene = _blocky((160, 160))
    prev, cur = scene[10:106, 10:106], scene[7:103, 14:110]  # content moves by (+3, -4)
    assert global_shift(prev, cur) == (3, -4)
    assert global_shift(prev, prev.copy()) == (0, 0)
    # a textured object in the middle moving (6, 6) while the camera holds still: the shift stays 0
    obj = _blocky((24, 24), seed=1, block=4) * 0.5 + 128
    a, b = prev.copy(), prev.copy()
    a[30:54, 30:54], b[36:60, 36:60] = obj, obj
    assert global_shift(a, b) == (0, 0)
    assert global_shift(np.full((64, 64), 7.0, np.float32), np.full((64, 64), 7.0, np.float32)) == (0, 0)


def test_aligned_difference_cancels_a_shift_and_zeroes_the_exposed_border():
    scene = _blocky((160, 160))
    prev, cur = scene[10:106, 10:106], scene[7:103, 14:110]
    plain = aligned_difference(prev, cur, (0, 0), 16)
    aligned = aligned_difference(prev, cur, (3, -4), 16)
    assert plain.shape == aligned.shape == (6, 6)
    assert plain.mean() > 20 and aligned.max() == 0.0
    changed = cur.copy()
    changed[40:48, 70:78] += 50.0  # inside patch (2, 4)
    diff = aligned_difference(prev, changed, (3, -4), 16)
    assert np.argwhere(diff > 0).tolist() == [[2, 4]] and diff[2, 4] == pytest.approx(50.0 * 64 / 256)


def _vectors(rows):
    dtype = [
        ("source", "<i4"),
        ("w", "u1"),
        ("h", "u1"),
        ("src_x", "<i2"),
        ("src_y", "<i2"),
        ("dst_x", "<i2"),
        ("dst_y", "<i2"),
        ("flags", "<u8"),
        ("motion_x", "<i4"),
        ("motion_y", "<i4"),
        ("motion_scale", "<u2"),
    ]
    return np.array([(s, w, h, 0, 0, x, y, 0, mx, my, 4) for s, w, h, x, y, mx, my in rows], dtype=dtype)


def test_mv_grid_weights_by_area_removes_the_median_and_scales_to_the_model():
    # a 32x32 frame of four 16x16 blocks (centres at 8/24); three still, one moving 8/4 = 2 px right
    still = [(-1, 16, 16, x, y, 0, 0) for x, y in ((8, 8), (24, 8), (8, 24))]
    grid = mv_grid(_vectors(still + [(-1, 16, 16, 24, 24, 8, 0)]), (32, 32), (2, 2), 16)
    np.testing.assert_allclose(grid, [[0, 0], [0, 2.0]])
    # the camera moves everything 1 px: the median removes it
    panned = [(s, w, h, x, y, mx + 4, my) for s, w, h, x, y, mx, my in still + [(-1, 16, 16, 24, 24, 8, 0)]]
    np.testing.assert_allclose(mv_grid(_vectors(panned), (32, 32), (2, 2), 16), [[0, 0], [0, 2.0]])
    # a bi-predicted block: the vector to the future reference is negated, the pair counts once
    bi = still + [(-1, 16, 16, 24, 24, 8, 0), (1, 16, 16, 24, 24, -8, 0)]
    np.testing.assert_allclose(mv_grid(_vectors(bi), (32, 32), (2, 2), 16), [[0, 0], [0, 2.0]])
    # an 8x8 block covers a quarter of its patch; a block half outside the frame counts its inside half
    small = still + [(-1, 8, 8, 20, 20, 8, 0), (-1, 16, 16, 32, 24, 0, 0)]
    np.testing.assert_allclose(mv_grid(_vectors(small), (32, 32), (2, 2), 16), [[0, 0], [0, 0.5]])
    # a 64x64 source on a 32x32 model frame: 2 source px are 1 model px
    big = [(-1, 16, 16, x, y, 0, 0) for x in (8, 24, 40, 56) for y in (8, 24, 40, 56)]
    big[-1] = (-1, 16, 16, 56, 56, 8, 0)
    np.testing.assert_allclose(mv_grid(_vectors(big), (64, 64), (2, 2), 16), [[0, 0], [0, 0.25]])
    assert mv_grid(_vectors([]), (32, 32), (2, 2), 16).shape == (2, 2)


def test_select_topk_exact_k_sorted_deterministic_and_first_frame_whole():
    scores = np.random.default_rng(0).random((6, 3, 4)).astype(np.float32)
    positions, spread = select_topk(scores, 20)
    assert positions.shape == (20, 3) and positions.dtype == np.int64 and spread == 0
    assert [tuple(p) for p in positions] == sorted({tuple(p) for p in positions})  # sorted, unique
    assert (positions[:12, 0] == 0).all()  # the whole first frame
    rest = scores[1:].reshape(-1)
    top8 = np.unravel_index(np.argsort(-rest, kind="stable")[:8] + 12, scores.shape)
    assert sorted(map(tuple, positions[12:].tolist())) == sorted(zip(*(a.tolist() for a in top8)))
    np.testing.assert_array_equal(select_topk(scores, 20)[0], positions)
    # K < one frame: the first frame's first K patches in raster order
    assert select_topk(scores, 5)[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    # without keep_first_frame: a pure global top-K
    top = select_topk(scores, 7, keep_first_frame=False)[0]
    expected = np.argwhere(scores >= np.sort(scores.reshape(-1))[-7])
    np.testing.assert_array_equal(top, expected)
    # K >= the dense grid: every patch
    assert len(select_topk(scores, 1000)[0]) == 72
    # ties go by index
    assert select_topk(np.ones((2, 2, 2), np.float32), 6)[0].tolist()[4:] == [[1, 0, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match="num_tokens=0"):
        select_topk(scores, 0)


def test_static_fallback_spreads_over_frames_and_positions():
    T, h, w = 16, 4, 4
    scores = np.zeros((T, h, w), np.float32)
    scores[3, 1, 1] = 1.0  # one changed patch
    positions, spread = select_topk(scores, 16 + 40)
    assert len(positions) == 56 and spread == 39
    assert [3, 1, 1] in positions.tolist()
    frames = np.unique(positions[16:, 0])
    assert len(frames) == T - 1  # every frame after the first gets some
    counts = np.bincount(positions[16:, 0], minlength=T)[1:]
    assert counts.max() - counts.min() <= 2
    assert len({(a, b) for _, a, b in positions[16:]}) == h * w  # the kept patches tile the frame
    # fewer tokens than frames: evenly spaced frames, one each
    few = select_topk(np.zeros((T, h, w), np.float32), 16 + 4)[0][16:]
    assert sorted(few[:, 0].tolist()) == [1, 4, 8, 12]  # van der Corput over frames 1..15: 1, 8, 4, 12
    # without the fallback: index order, piling into the earliest frames (the reference's ties)
    piled, spread = select_topk(np.zeros((T, h, w), np.float32), 16 + 40, static_fallback=False)
    assert spread == 0 and set(piled[16:, 0].tolist()) == {1, 2, 3}


def test_budget_forms_and_their_errors():
    S = 196
    assert CodecSparseConfig().num_tokens(64, S) == round(0.125 * 64 * S)
    assert CodecSparseConfig(budget=1000).num_tokens(64, S) == 1000
    assert CodecSparseConfig(budget=0.1).num_tokens(64, S) == round(0.1 * 64 * S)
    assert CodecSparseConfig(budget=1.0).num_tokens(64, S) == 64 * S
    assert CodecSparseConfig(budget_frames=8).num_tokens(64, S) == 8 * S
    assert CodecSparseConfig(budget=10**9).num_tokens(64, S) == 64 * S  # more than the clip: dense
    assert CodecSparseConfig.reference().num_tokens(64, 1296) == 10368  # the reference's K
    for kwargs, match in [
        (dict(budget=0), r"budget=0;"),
        (dict(budget=-5), r"budget=-5;"),
        (dict(budget=0.0), r"budget=0\.0;"),
        (dict(budget=1.5), r"budget=1\.5; a float is a fraction"),
        (dict(budget=True), r"budget=True;"),
        (dict(budget_frames=0), r"budget_frames=0;"),
        (dict(budget=100, budget_frames=8), r"give one of them"),
        (dict(frames=0), r"frames=0;"),
        (dict(signals=("optical_flow",)), r"signals=\('optical_flow',\)"),
        (dict(signals=("difference",), weights=(1.0, 2.0)), r"weights=\(1\.0, 2\.0\); expected 1"),
        (dict(normalize="global"), r"normalize='global'"),
    ]:
        with pytest.raises(ValueError, match=match):
            CodecSparseConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# synthetic clips: recall of known motion
# --------------------------------------------------------------------------------------------------

CONFIG = CodecSparseConfig(frames=FRAMES, budget=0.1)


@pytest.mark.parametrize("motion", ["square", "pan"])
@pytest.mark.parametrize("codec", list(ENCODERS))
def test_selection_recalls_the_moving_square(clips, codec, motion):
    path, boxes = clips(codec, motion)
    selection = select_patches(path, P, CONFIG)
    T = FRAMES
    K = round(0.1 * T * GRID * GRID)
    assert selection.grid_thw == (T, GRID, GRID) and selection.num_tokens == K
    truth = square_patches(boxes, selection.frame_ids.numpy())
    got = recall(selection.positions, truth)
    controls = recall(random_positions(T, K), truth), recall(uniform_frame_positions(T, K), truth)
    assert got >= 0.9 and max(controls) <= 0.2, (got, controls)
    if motion == "pan":
        assert (selection.shifts[1:] == torch.tensor(MOTIONS["pan"])).all(1).float().mean() > 0.9  # the camera is found
        plain = select_patches(path, P, CodecSparseConfig(frames=FRAMES, budget=0.1, signals=("difference",)))
        assert recall(plain.positions, truth) < got - 0.3
    if codec == "libx265":  # stock FFmpeg exports no HEVC motion vectors: the difference alone, recorded
        assert not selection.has_vectors.any()
    # counting every patch the square touches, 1-px slivers included (measured 0.90-0.97)
    assert recall(selection.positions, square_patches(boxes, selection.frame_ids.numpy(), min_cover=1e-9)) >= 0.85


def test_vectors_are_exported_for_every_p_and_b_frame_and_fused_per_frame(clips):
    """Slice threading keeps the side data; frames without vectors (I) fall back to the difference alone."""
    path, boxes = clips("libx264")
    selection = select_patches(
        path, P, CodecSparseConfig(frames=FRAMES, budget=0.1, signals=("motion_vectors", "aligned_difference"))
    )
    types = selection.pict_types
    assert len(types) == FRAMES and set(types) <= set("IPB") and "B" in types
    assert selection.has_vectors.tolist() == [c in "PB" for c in types]
    assert selection.frame_signals[0] == ()
    for t in range(1, FRAMES):
        expected = ("motion_vectors", "aligned_difference") if types[t] in "PB" else ("aligned_difference",)
        assert selection.frame_signals[t] == expected
    assert recall(selection.positions, square_patches(boxes, selection.frame_ids.numpy())) >= 0.85
    reference = select_patches(path, P, CodecSparseConfig.reference(frames=FRAMES))
    assert reference.num_tokens == 8 * GRID * GRID
    assert selection.summary()["frames_with_vectors"] == types.count("P") + types.count("B")


def test_hevc_records_no_vectors_and_falls_back_to_the_difference(clips):
    path, boxes = clips("libx265")
    selection = select_patches(
        path, P, CodecSparseConfig(frames=FRAMES, budget=0.1, signals=("motion_vectors", "aligned_difference"))
    )
    assert not selection.has_vectors.any()
    assert all(used == ("aligned_difference",) for used in selection.frame_signals[1:])
    assert selection.summary()["signals"] == ["aligned_difference"]
    assert recall(selection.positions, square_patches(boxes, selection.frame_ids.numpy())) >= 0.9


def test_a_static_clip_spreads_its_budget_over_time(clips):
    path, _ = clips("mpeg4", "static")
    selection = select_patches(path, P, CONFIG)
    later = selection.positions[selection.positions[:, 0] > 0]
    assert selection.spread_tokens > 0.8 * len(later)
    assert len(torch.unique(later[:, 0])) >= FRAMES // 2
    assert selection.num_tokens == round(0.1 * FRAMES * GRID * GRID)


def test_selection_is_deterministic_and_well_formed(clips):
    path, _ = clips("mpeg4")
    a, b = select_patches(path, P, CONFIG), select_patches(path, P, CONFIG)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.scores, b.scores)
    assert a.positions.dtype == torch.int64 and a.frame_ids.tolist() == list(range(FRAMES))
    keys = [tuple(p) for p in a.positions.tolist()]
    assert keys == sorted(set(keys))
    assert a.indices.tolist() == [t * GRID * GRID + h * GRID + w for t, h, w in keys]
    spread = a.patch_positions(temporal_positions(FRAMES, 64))
    assert spread[:, 0].max() == 63 and torch.equal(spread[:, 1:], a.positions[:, 1:])


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


def test_a_clip_shorter_than_frames_uses_all_its_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_moving_clip(path, frames=6, size=64)
    selection = select_patches(path, P, CodecSparseConfig(frames=64, budget=0.25))
    assert selection.frame_ids.tolist() == [0, 1, 2, 3, 4, 5] and selection.total_frames == 6
    assert selection.grid_thw == (6, 4, 4) and selection.num_tokens == round(0.25 * 6 * 16)
    dense = select_patches(path, P, CodecSparseConfig(frames=64, budget=10_000))  # more than the clip: all
    assert dense.num_tokens == 96 and dense.indices.tolist() == list(range(96))


def test_bad_files_raise_errors_naming_them(tmp_path):
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    with pytest.raises(ValueError, match=rf"{audio.name} has no video stream \(its streams: audio\)"):
        select_patches(audio, P)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(ValueError, match=rf"{junk.name} is not a readable media file"):
        select_patches(junk, P)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        select_patches(tmp_path / "missing.mp4", P)
    clip = tmp_path / "clip.mp4"
    write_moving_clip(clip, frames=4, size=64)
    with pytest.raises(ValueError, match=r"config.size is 60x64; .* multiples of patch_size=16"):
        select_patches(clip, P, CodecSparseConfig(size=(60, 64)))
    with pytest.raises(ValueError, match="budget=0;"):
        select_patches(clip, P, CodecSparseConfig(budget=0))


def test_frame_size_defaults_to_the_video_rounded_down_and_capped(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_moving_clip(clip, frames=3, size=72)
    assert select_patches(clip, P).size == (64, 64)
    assert select_patches(clip, P, CodecSparseConfig(max_tokens_per_frame=9)).size == (48, 48)
    assert select_patches(clip, 14, CodecSparseConfig(size=(112, 56))).grid_thw == (3, 8, 4)


# --------------------------------------------------------------------------------------------------
# encoding a selection, the preview
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [16, 14])
def test_packing_a_selection_equals_the_standard_model_with_visible_indices(tmp_path, patch_size, one_thread):
    clip = tmp_path / "clip.mp4"
    write_moving_clip(clip, frames=8, size=64)
    config = CodecSparseConfig(frames=6, budget=0.3, size=(4 * patch_size, 3 * patch_size))
    selection = select_patches(clip, patch_size, config)
    standard = HEVCViTModel(tiny_config(patch_size=patch_size)).eval()
    packing = HEVCViTPackingModel(tiny_config(patch_size=patch_size)).eval()
    packing.load_state_dict(standard.state_dict())
    t_positions = temporal_positions(6, 64)
    # the dense clip, decoded independently and processed the same way
    with av.open(str(clip)) as container:
        rgb = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    preprocess = default_preprocess(selection.size)
    video = torch.stack([preprocess(rgb[i]) for i in selection.frame_ids.tolist()], dim=1)[None]  # (1, C, T, H, W)
    dense_positions = video_patch_positions(selection.grid_thw, t_positions)[None]
    with torch.no_grad():
        last, pooled = encode_selection(packing, clip, selection, t_positions=t_positions)
        expected = standard(video, visible_indices=selection.indices[None], patch_positions=dense_positions)
    assert last.shape == (selection.num_tokens, 64)
    assert_close_rel(last, expected.last_hidden_state[0], what="last_hidden_state")
    assert_close_rel(pooled, expected.pooler_output, what="pooler_output")
    patches, positions = gather_selected_patches(clip, selection)
    assert patches.shape == (selection.num_tokens, 3 * patch_size**2) and torch.equal(positions, selection.positions)
    dense_patches, _ = patchify(video, patch_size)  # (T·h·w, C·p·p)
    assert torch.equal(patches, dense_patches[selection.indices])
    with pytest.raises(ValueError, match=r"preprocess returned shape \(3, 10, 10\)"):
        gather_selected_patches(clip, selection, preprocess=lambda rgb: torch.zeros(3, 10, 10))


def test_render_preview_dims_the_patches_not_kept(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_moving_clip(clip, frames=6, size=64)
    selection = select_patches(clip, P, CodecSparseConfig(frames=6, budget=0.3))
    out = render_preview(clip, selection, tmp_path / "preview.png", columns=4, labels=False)
    with Image.open(out) as png:
        image = np.asarray(png.convert("RGB")).astype(np.float64)
    assert out.suffix == ".png" and image.shape == (2 * 64 + 3 * 2, 4 * 64 + 5 * 2, 3)
    keep = np.zeros(selection.grid_thw, bool)
    keep[tuple(selection.positions.numpy().T)] = True
    kept, dimmed = [], []
    for t in range(6):
        y0, x0 = 2 + (t // 4) * 66, 2 + (t % 4) * 66
        for h in range(4):
            for w in range(4):
                patch = image[y0 + 16 * h : y0 + 16 * h + 16, x0 + 16 * w : x0 + 16 * w + 16].mean()
                (kept if keep[t, h, w] else dimmed).append(patch)
    assert np.mean(kept) > 2 * np.mean(dimmed)
    labelled = render_preview(clip, selection, tmp_path / "labelled.png")
    with Image.open(labelled) as png:
        assert png.size == (6 * 64 + 7 * 2, 64 + 2 * 2)  # default 8 columns: one row of 6


def test_codec_preview_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="hevc-vit")
    register_cli(parser.add_subparsers(dest="command"))
    clip = tmp_path / "clip.mp4"
    write_moving_clip(clip, frames=6, size=64)
    args = parser.parse_args(
        [
            "codec-preview",
            str(clip),
            "-o",
            str(tmp_path / "sheet.png"),
            "--frames",
            "4",
            "--tokens",
            "20",
            "--columns",
            "2",
        ]
    )
    assert args.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 20 and summary["frames"] == 4 and summary["preview"].endswith("sheet.png")
    with Image.open(tmp_path / "sheet.png") as png:
        assert png.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    for argv, message in [  # out of range: refused while parsing
        (["--ratio", "0"], "argument --ratio: '0'; expected a number in (0, 1]"),
        (["--size", "64"], "argument --size: '64'; expected HxW"),
    ]:
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["codec-preview", str(clip), "-o", str(tmp_path / "x.png"), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    args = parser.parse_args(["codec-preview", str(clip), "-o", str(tmp_path / "x.png"), "--signals", "flow"])
    assert args.run(args) == 2
    assert "signals=('flow',)" in capsys.readouterr().err
    args = parser.parse_args(["codec-preview", str(tmp_path / "none.mp4"), "-o", str(tmp_path / "x.png")])
    assert args.run(args) == 2 and "none.mp4 does not exist" in capsys.readouterr().err


def test_a_named_pipe_is_refused_without_being_opened(tmp_path):
    """Opening a FIFO waits for a writer forever: every codec entry point looks at the file type first."""
    import os

    from hevc_vit.codec.assets import AssetSettings, compute_assets

    os.mkfifo(tmp_path / "pipe.mp4")
    expected = "is not a regular file but a named pipe (FIFO); expected a video file"
    with pytest.raises(ValueError, match=re.escape(expected)):
        select_patches(tmp_path / "pipe.mp4", 16, CodecSparseConfig(frames=4))
    with pytest.raises(ValueError, match=re.escape(expected)):
        compute_assets(tmp_path / "pipe.mp4", AssetSettings())
