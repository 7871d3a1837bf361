# ruff: noqa: UP006, UP015, UP035, UP045  (vendored code keeps the reference's typing spelling)
"""The reference's pure functions that the codec-assets tests compare against, vendored (copied, not imported).

Source: https://github.com/EvolvingLMMs-Lab/OneVision-Encoder at commit c2cd3e0d85c7c44d1b1b1bad5317ceb6ff6fe93a.
  * ``llava_next/Compressed_Video_Reader/tool/offline_precompute_llava_codec_assets.py`` — Apache License 2.0
    (the repository's ``LICENSE``): ``_sample_frame_ids_uniform_range``, ``_choose_window_start_offset`` (its
    ``energy3`` branch, which runs ``ffprobe``, left out), ``_preprocess_bgr_to_square``,
    ``_valid_patch_mask_from_pad``, ``_build_mosaics_time_spatial_np``, ``_is_done``, and the selection part of
    ``_compute_visible_indices_pack_topk_time_spatial`` (from the score volume on: mandatory frames, global /
    time_bucket top-K, padding, sort, visible indices) as :func:`reference_select`. The FFmpeg extension
    (``cv_reader``) and the video I/O are not vendored.
  * ``llava_next/llava/train/train.py`` (``LazySupervisedDataset._get_item``) — Apache License 2.0: the lines
    that read a record's ``positions_thw`` and ``images``, as :func:`reference_read_record`.
  * ``llava_next/lmms-eval/lmms_eval/models/simple/llava_ov_encoder.py`` — MIT License (``llava_next/lmms-eval/
    LICENSE``, Copyright (c) 2025 LMMs-Lab): the offline asset lookup (``_build_offline_index`` …
    ``_offline_load_visuals_and_positions``), its logging removed, the environment read through arguments.

Code below is the reference's but for those removals and the noted argument changes; the OpenCV calls stay
(``cv2`` is imported lazily: only the tests that use them need it).
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

# ---------------------------------------------------------------- offline_precompute_llava_codec_assets.py


def _sample_frame_ids_uniform_range(start_fid: int, end_fid: int, seq_len: int) -> List[int]:
    start_fid = int(start_fid)
    end_fid = int(end_fid)
    seq_len = int(seq_len)
    if seq_len <= 0:
        return []
    if end_fid < start_fid:
        end_fid = start_fid
    return np.linspace(start_fid, end_fid, seq_len, dtype=np.int32).tolist()


def _choose_window_start_offset(total_frames: int, window_len: int, pick_mode: str) -> int:
    """(``video_path``/``fps`` and the ``energy3`` branch removed; returns the offset only.)"""
    total_frames = int(total_frames)
    window_len = int(window_len)
    pick = (pick_mode or "none").lower().strip()
    if window_len <= 0 or total_frames <= 0:
        return 0
    if total_frames <= window_len:
        return 0
    begin = 0
    end = max(0, total_frames - window_len)
    mid = max(0, (total_frames - window_len) // 2)
    if pick in ("begin", "start"):
        return int(begin)
    if pick in ("end", "tail"):
        return int(end)
    if pick in ("mid", "middle"):
        return int(mid)
    return 0


def reference_window(T_all: int, window_len: int, window_pick: str) -> Tuple[int, int]:
    """The lines of ``_compute_visible_indices_pack_topk_time_spatial`` that choose ``(start, end)``."""
    if int(window_len) > 0 and int(T_all) > int(window_len):
        start_offset = _choose_window_start_offset(int(T_all), int(window_len), str(window_pick))
        end_offset = min(int(T_all) - 1, int(start_offset) + int(window_len) - 1)
    else:
        start_offset = 0
        end_offset = int(T_all) - 1
    return start_offset, end_offset


def _preprocess_bgr_to_square(frame_bgr: np.ndarray, out_size: int = 576) -> np.ndarray:
    """Resize longer side to out_size and pad to out_size x out_size (center). Returns BGR uint8."""
    import cv2  # optional: only the frame-preparation comparison needs OpenCV

    if frame_bgr is None:
        raise ValueError("frame_bgr is None")
    H, W = frame_bgr.shape[:2]
    out_size = int(out_size)
    if H <= 0 or W <= 0:
        raise ValueError(f"Bad frame shape: {frame_bgr.shape}")

    scale = float(out_size) / float(max(H, W))
    Hn = max(1, int(round(H * scale)))
    Wn = max(1, int(round(W * scale)))

    resized = cv2.resize(frame_bgr, (Wn, Hn), interpolation=cv2.INTER_LINEAR)

    pad_top = (out_size - Hn) // 2
    pad_left = (out_size - Wn) // 2

    canvas = np.zeros((out_size, out_size, 3), dtype=np.uint8)
    canvas[pad_top : pad_top + Hn, pad_left : pad_left + Wn] = resized
    return canvas


def _valid_patch_mask_from_pad(out_size: int, patch: int, pad_top: int, pad_left: int, Hn: int, Wn: int) -> np.ndarray:
    out_size = int(out_size)
    p = int(patch)
    hb, wb = out_size // p, out_size // p

    content_top = int(pad_top)
    content_left = int(pad_left)
    content_bottom = int(pad_top + Hn)
    content_right = int(pad_left + Wn)

    mask = np.zeros((hb, wb), dtype=bool)
    for h in range(hb):
        y0, y1 = h * p, (h + 1) * p
        if y0 < content_top or y1 > content_bottom:
            continue
        for w in range(wb):
            x0, x1 = w * p, (w + 1) * p
            if x0 < content_left or x1 > content_right:
                continue
            mask[h, w] = True
    return mask


def _build_mosaics_time_spatial_np(
    frames_sq: List[np.ndarray],
    thw_packed: np.ndarray,
    num_images: int = 8,
    square_size: int = 576,
    patch_size: int = 16,
) -> List[np.ndarray]:
    """Return list of BGR uint8 mosaics (not PIL), for saving to jpg."""
    p = int(patch_size)
    hb, wb = int(square_size) // p, int(square_size) // p
    S_img = hb * wb

    thw_packed = np.asarray(thw_packed, dtype=np.int32)
    if thw_packed.shape[0] != int(num_images) * int(S_img):
        raise RuntimeError(f"thw_packed rows={thw_packed.shape[0]} != num_images*S_img ({num_images}*{S_img})")

    mosaics: List[np.ndarray] = []
    for i in range(int(num_images)):
        canvas = np.zeros((int(square_size), int(square_size), 3), dtype=np.uint8)
        chunk = thw_packed[i * S_img : (i + 1) * S_img]

        for j, (t, h, w) in enumerate(chunk.tolist()):
            rr = int(j) // int(wb)
            cc = int(j) % int(wb)
            ys = rr * int(p)
            xs = cc * int(p)

            y0 = int(h) * int(p)
            x0 = int(w) * int(p)
            patch_bgr = frames_sq[int(t)][y0 : y0 + int(p), x0 : x0 + int(p)]
            canvas[ys : ys + int(p), xs : xs + int(p)] = patch_bgr

        mosaics.append(canvas)
    return mosaics


def _is_done(asset_dir: Path, num_images: int) -> bool:
    if not asset_dir.exists():
        return False
    need = [
        asset_dir / "meta.json",
        asset_dir / "frame_ids.npy",
        asset_dir / "visible_indices.npy",
        asset_dir / "positions_thw.npy",
    ]
    for p in need:
        if not p.exists():
            return False
    for i in range(num_images):
        if not (asset_dir / f"mosaic_{i:03d}.jpg").exists():
            return False
    return True


def reference_select(
    fused_scores: np.ndarray,
    valid_mask: np.ndarray,
    num_images: int,
    keep_mid_full_frame: bool = False,
    mid_full_frame_index: int = -1,
    topk_mode: str = "global",
    time_bucket_count: int = -1,
) -> Tuple[np.ndarray, np.ndarray]:
    """``_compute_visible_indices_pack_topk_time_spatial`` from its per-patch scores on: ``fused_scores`` is its
    ``scores`` (``(T, hb·wb)`` patch sums of the fused map) before masking. Returns ``(thw int32, visible int64)``."""
    seq_len_frames = fused_scores.shape[0]
    hb, wb = valid_mask.shape
    S_total = hb * wb
    S_valid = int(valid_mask.sum())

    scores = torch.from_numpy(np.asarray(fused_scores, dtype=np.float32)).reshape(int(seq_len_frames), S_total)
    mask_flat = torch.from_numpy(valid_mask.reshape(-1))
    scores[:, ~mask_flat] = -1e6

    target = int(num_images) * int(S_total)

    # mandatory first frame
    hh0 = np.repeat(np.arange(hb, dtype=np.int32), wb)
    ww0 = np.tile(np.arange(wb, dtype=np.int32), hb)
    tt0 = np.zeros((S_total,), dtype=np.int32)
    mandatory_thw = np.stack([tt0, hh0, ww0], axis=1).astype(np.int32)  # (1296,3)

    # optional mandatory middle frame (as a whole mosaic image)
    keep_mid = bool(keep_mid_full_frame) and int(num_images) >= 2 and int(seq_len_frames) >= 2
    mid_t = int(mid_full_frame_index)
    if keep_mid:
        if mid_t < 0:
            mid_t = int(seq_len_frames) // 2
        mid_t = max(0, min(int(seq_len_frames) - 1, int(mid_t)))
        # avoid duplicating the first frame
        if mid_t == 0:
            keep_mid = False

    if keep_mid:
        tt_mid = np.full((S_total,), int(mid_t), dtype=np.int32)
        mandatory_mid_thw = np.stack([tt_mid, hh0, ww0], axis=1).astype(np.int32)  # (1296,3)
    else:
        mid_t = -1
        mandatory_mid_thw = np.zeros((0, 3), dtype=np.int32)

    K_rem = int(target) - int(S_total) - (int(S_total) if keep_mid else 0)
    if K_rem <= 0:
        thw = np.concatenate([mandatory_thw, mandatory_mid_thw], axis=0)[:target]
    else:
        scores_rem = scores.clone()
        scores_rem[0, :] = -1e6
        if keep_mid and mid_t >= 0:
            scores_rem[int(mid_t), :] = -1e6

        mode = str(topk_mode or "global").lower().strip()
        if mode not in ("global", "time_bucket"):
            mode = "global"

        rest_thw = np.zeros((0, 3), dtype=np.int32)

        if mode == "global":
            avail_rem = max(0, (int(seq_len_frames) - 1 - (1 if keep_mid else 0)) * int(S_valid))
            k_take = min(int(K_rem), int(avail_rem))
            if k_take > 0:
                flat = scores_rem.reshape(-1)
                _, topidx = torch.topk(flat, k=int(k_take), largest=True, sorted=True)
                topidx_np = topidx.cpu().numpy().astype(np.int64)

                t = (topidx_np // S_total).astype(np.int32)
                s = (topidx_np % S_total).astype(np.int32)
                h = (s // wb).astype(np.int32)
                w = (s % wb).astype(np.int32)
                rest_thw = np.stack([t, h, w], axis=1).astype(np.int32)

        else:
            num_full = 1 + (1 if keep_mid else 0)
            num_rest_images = max(0, int(num_images) - int(num_full))

            bucket_cnt = int(time_bucket_count)
            if bucket_cnt <= 0:
                bucket_cnt = int(num_rest_images)
            bucket_cnt = max(1, min(bucket_cnt, max(1, int(seq_len_frames) - int(num_full))))

            excluded = {0}
            if keep_mid and mid_t >= 0:
                excluded.add(int(mid_t))
            ts_all = [t for t in range(int(seq_len_frames)) if int(t) not in excluded]
            if len(ts_all) == 0:
                ts_all = [0]

            buckets = np.array_split(np.asarray(ts_all, dtype=np.int32), int(bucket_cnt))

            per_bucket_take = int(S_total)  # one mosaic per bucket
            out_list: List[np.ndarray] = []
            for b in buckets:
                if b.size == 0:
                    continue
                sb = scores_rem[b.tolist(), :]  # (Tb, S_total)
                avail_b = max(0, int(b.size) * int(S_valid))
                k_take_b = min(int(per_bucket_take), int(avail_b))
                if k_take_b <= 0:
                    continue

                flat_b = sb.reshape(-1)
                _, topidx_b = torch.topk(flat_b, k=int(k_take_b), largest=True, sorted=True)
                topidx_np = topidx_b.cpu().numpy().astype(np.int64)

                t_local = (topidx_np // S_total).astype(np.int32)
                s = (topidx_np % S_total).astype(np.int32)
                t = b[t_local].astype(np.int32)
                h = (s // wb).astype(np.int32)
                w = (s % wb).astype(np.int32)
                out_list.append(np.stack([t, h, w], axis=1).astype(np.int32))

            if out_list:
                rest_thw = np.concatenate(out_list, axis=0)

            if rest_thw.shape[0] > int(K_rem):
                rest_thw = rest_thw[: int(K_rem)]

        thw = np.concatenate([mandatory_thw, mandatory_mid_thw, rest_thw], axis=0)

    # force exact target
    if thw.shape[0] < target:
        if thw.shape[0] == 0:
            thw = np.zeros((target, 3), dtype=np.int32)
        else:
            pad_n = target - thw.shape[0]
            thw = np.concatenate([thw, np.repeat(thw[-1:], pad_n, axis=0)], axis=0)
    elif thw.shape[0] > target:
        thw = thw[:target]

    sorted_indices = np.lexsort((thw[:, 2], thw[:, 1], thw[:, 0]))
    thw = thw[sorted_indices]

    thw64 = thw.astype(np.int64)
    visible_indices = thw64[:, 0] * int(S_total) + thw64[:, 1] * int(wb) + thw64[:, 2]
    return thw.astype(np.int32), visible_indices.astype(np.int64)


# ---------------------------------------------------------------- llava/train/train.py (_get_item)


def reference_read_record(record: Dict[str, Any], image_folder: str = "") -> Tuple[Optional[torch.Tensor], str, list]:
    """The lines of ``_get_item`` that read a record's ``positions_thw`` and ``images``: returns
    ``(patch_positions, branch, images)`` — ``branch`` "image" (< 9 images) or "video" (> 8), the images as
    ``process_image`` opens them (``Image.open(os.path.join(image_folder, f)).convert("RGB")``)."""
    sources = [record]
    if "positions_thw" in sources[0]:
        patch_positions = torch.tensor(np.load(sources[0]["positions_thw"])).unsqueeze(0)
    else:
        patch_positions = None

    def process_image(image_file):  # the opening lines of process_image
        return Image.open(os.path.join(image_folder, image_file)).convert("RGB")

    if "images" in sources[0] and len(sources[0]["images"]) < 9:
        branch, image = "image", [process_image(f) for f in record["images"]]
    elif "images" in sources[0] and len(sources[0]["images"]) > 8:
        branch, image = "video", [process_image(f) for f in record["images"]]
    else:
        branch, image = "none", []
    return patch_positions, branch, image


# ---------------------------------------------------------------- lmms-eval llava_ov_encoder.py (offline lookup)


def _normalize_video_id(video_path: str) -> str:
    return Path(video_path).stem


def _build_offline_index(root: str) -> Dict[str, str]:
    index: Dict[str, str] = {}
    if not root or (not os.path.exists(root)):
        return index
    for dirpath, _, filenames in os.walk(root):
        if "meta.json" not in filenames:
            continue
        meta_path = os.path.join(dirpath, "meta.json")
        try:
            with open(meta_path, "r", encoding="utf-8") as f:
                meta = json.load(f)
        except Exception:
            continue
        v = meta.get("video") or meta.get("video_path")
        if v:
            try:
                stem = Path(str(v)).stem
                if stem and stem not in index:
                    index[stem] = dirpath
            except Exception:
                pass
        k = meta.get("key")
        if k:
            k = str(k)
            if k and k not in index:
                index[k] = dirpath
    return index


def _offline_dir_from_index(root: str, video_path: str) -> Optional[str]:
    """(The module-level cache dropped: the index is built on every call.)"""
    root = (root or "").rstrip("/")
    if not root:
        return None
    index = _build_offline_index(root)
    stem = Path(video_path).stem
    if not stem:
        return None
    d = index.get(stem) if index else None
    if d and os.path.exists(d):
        return d
    return None


def _candidate_offline_dirs(video_path: str, root: str) -> List[str]:
    """(``root`` passed in, not read from ``LLAVA_CODEC_OFFLINE_ROOT``.)"""
    root = root.rstrip("/")
    if not root:
        return []
    vid = _normalize_video_id(video_path)
    cand = []
    cand.append(os.path.join(root, vid))
    cand.append(root)
    try:
        idx_dir = _offline_dir_from_index(root, video_path)
        if idx_dir:
            cand.append(idx_dir)
    except Exception:
        pass
    out = []
    seen = set()
    for p in cand:
        if p and p not in seen:
            seen.add(p)
            if os.path.exists(p):
                out.append(p)
    return out


def _find_offline_images(off_dir: str, max_images: int = 8) -> List[str]:
    if not off_dir or not os.path.exists(off_dir):
        return []
    exts = ("*.jpg", "*.jpeg", "*.png", "*.webp")
    prefer = []
    for pat in ("mosaic*", "pack*", "grid*", "image*"):
        for ext in exts:
            prefer.extend(glob.glob(os.path.join(off_dir, f"{pat}{ext[1:]}")))
    any_imgs = []
    for ext in exts:
        any_imgs.extend(glob.glob(os.path.join(off_dir, ext)))
    merged = []
    seen = set()
    for lst in (prefer, any_imgs):
        for p in lst:
            if p not in seen:
                seen.add(p)
                merged.append(p)

    def _nat_key(s: str):
        base = os.path.basename(s)
        parts = re.split(r"(\d+)", base)
        key = []
        for x in parts:
            if x.isdigit():
                key.append(int(x))
            else:
                key.append(x)
        return key

    merged = sorted(merged, key=_nat_key)
    return merged[: max(1, int(max_images))]


def _find_positions_npy(off_dir: str) -> Optional[str]:
    if not off_dir or not os.path.exists(off_dir):
        return None
    for name in (
        "position.npy",
        "positions.npy",
        "position_ids.npy",
        "patch_positions.npy",
        "patch_positions.pt.npy",
        "position_ids.pt.npy",
        "positions_thw.npy",
        "positions_thw_int32.npy",
    ):
        p = os.path.join(off_dir, name)
        if os.path.exists(p):
            return p
    hits = glob.glob(os.path.join(off_dir, "*position*.npy"))
    if hits:
        return sorted(hits)[0]
    return None


def _load_patch_positions_from_npy(npy_path: str, device: torch.device) -> Optional[torch.Tensor]:
    if not npy_path or not os.path.exists(npy_path):
        return None
    try:
        arr = np.load(npy_path)
        if arr is None:
            return None
        if arr.ndim == 2 and arr.shape[-1] == 3:
            t = torch.from_numpy(arr).long().unsqueeze(0)
        elif arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[-1] == 3:
            t = torch.from_numpy(arr).long()
        else:
            return None
        return t.to(device)
    except Exception:
        return None


def _offline_load_visuals_and_positions(
    video_path: str, root: str, max_images: int = 8, device: str = "cpu"
) -> Tuple[Optional[List[Image.Image]], Optional[torch.Tensor], Optional[str]]:
    """(``root`` and ``max_images`` passed in, not read from the environment; logging removed.)"""
    cand_dirs = _candidate_offline_dirs(video_path, root)
    chosen = None
    visuals = None
    pos = None
    for d in cand_dirs:
        imgs = _find_offline_images(d, max_images=max_images)
        if imgs:
            chosen = d
            try:
                visuals = [Image.open(p).convert("RGB") for p in imgs]
            except Exception:
                visuals = None
                continue
            npy = _find_positions_npy(d)
            pos = _load_patch_positions_from_npy(npy, device=device) if npy else None
            break
    if chosen is None:
        return None, None, None
    return visuals, pos, chosen
