"""``hevc-vit bench --pipeline``: how fast one loader worker turns files into patches, old path against new.

What one worker of ``hevc-vit encode`` does per input — read, decode, resize, normalise, patchify, i.e.
:func:`hevc_vit.encode.decode.load.load_item` — is timed on one process and one thread, per file, in four
variants taken round-robin on every file (so a slow spell of a shared machine hits all four alike):

    baseline     the path before the pipeline work: a full decode and a copy of the image, the float64
                 rescale and float32 normalisation of the (C, H, W) image, then a separate patchify.
    full_decode  ``load_item`` with ``jpeg_draft=False``: same pixels as the baseline, put in patch order as
                 8-bit samples; they are normalised where the model runs (``LoadedItem.float_patches``).
    draft        ``load_item`` as ``encode`` runs it by default: JPEGs decoded at a reduced DCT scale
                 (1/2, 1/4, 1/8) no smaller than the resize target, then resized the rest of the way.
    draft_norm   ``draft`` and the normalisation after it, in the same thread: the whole preprocessing of an
                 item when the model's device is this CPU (on a GPU the normalisation runs there instead).

Reported: items/s and tokens/s per variant (images, videos, all), their ratio to the baseline, and how far
the draft path moves the input: patch differences in 8-bit pixel levels and, through a model, the
per-token cosine of the features against the full decode.

With no folder, a deterministic synthetic set is written to a temporary folder: JPEGs whose long side is
spread over 256..4,000 px (textured, so that resampling differences show) and, with PyAV, two short clips.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.decode.load import load_item
from hevc_vit.encode.model.loader import build_processor, load_model
from hevc_vit.media.kinds import MEDIA_EXTENSIONS, VIDEO_EXTENSIONS
from hevc_vit.media.video import read_video, video_patch_positions
from hevc_vit.modeling import HEVCViTPackingModel
from hevc_vit.packing import PackingPlan, grid_positions, patchify
from hevc_vit.processing.pixels import normalize_reference

VARIANTS = ("baseline", "full_decode", "draft", "draft_norm")
_ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1), (3, 2), (9, 16), (2, 1), (5, 4))


# --------------------------------------------------------------------------------------------------
# the files
# --------------------------------------------------------------------------------------------------


def make_synthetic_set(folder: str | Path, images: int = 40, clips: int = 2, seed: int = 0) -> list[Path]:
    """Write ``images`` JPEGs (long side spread geometrically over 256..4,000 px, eight aspect ratios) and,
    when PyAV is installed, ``clips`` short clips into ``folder``; the same files for the same arguments."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, long_side in enumerate(np.geomspace(256, 4000, images) if images else []):
        a, b = _ASPECTS[i % len(_ASPECTS)]
        w, h = (round(long_side), round(long_side * b / a)) if a >= b else (round(long_side * a / b), round(long_side))
        path = folder / f"image_{i:03d}_{w}x{h}.jpg"
        _textured(w, h, np.random.default_rng(seed + i)).save(path, quality=90)
        paths.append(path)
    if clips:
        try:
            import av  # noqa: F401  (optional: the 'video' extra)
        except ImportError:
            return paths
        for i, (w, h, frames) in enumerate([(640, 360, 96), (480, 480, 64)][:clips]):
            path = folder / f"clip_{i}_{w}x{h}.mp4"
            _write_clip(path, w, h, frames, np.random.default_rng(seed + 1000 + i))
            paths.append(path)
    return paths


def _textured(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Broad colour fields, finer texture at a quarter of the resolution and mild per-pixel noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8))
    fine = Image.fromarray(rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), dtype=np.uint8))
    x = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) * 0.7
    x += np.asarray(fine.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) * 0.3
    x += rng.normal(0, 4, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def _write_clip(path: Path, width: int, height: int, frames: int, rng: np.random.Generator) -> None:
    import av  # optional: the 'video' extra

    base = np.asarray(_textured(width + frames * 2, height, rng))  # a scene panned sideways, 2 px a frame
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, 2 * t : 2 * t + width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def media_files(folder: str | Path) -> list[Path]:
    """The images and videos under ``folder`` (recursive), by name."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower()[1:] in MEDIA_EXTENSIONS)


# --------------------------------------------------------------------------------------------------
# the three ways of loading
# --------------------------------------------------------------------------------------------------


def load_baseline(index: int, path: str | Path, options: LoadOptions) -> LoadedItem:
    """One input the way the loader worked before the pipeline work (for comparison only): a full decode and a
    copy of the image, each frame normalised as a float64-then-float32 ``(C, H, W)`` image, then patchified."""
    processor, path = options.processor, Path(path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        kind, frames = "video", read_video(path, options.frames).frames
    else:
        with Image.open(path) as image:
            image.load()
            kind, frames = "image", [image.copy()]
    size = processor.output_size(frames[0].height, frames[0].width, num_frames=len(frames) if kind == "video" else None)
    settings = processor.image_mean, processor.image_std, processor.rescale_factor
    flags = processor.do_rescale, processor.do_normalize
    pixels = [normalize_reference(processor.pixels(frame, size), *settings, *flags) for frame in frames]
    chw = [torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))) for x in pixels]  # (C, H, W) each
    batch = chw[0][None] if kind == "image" else torch.stack(chw, dim=1)[None]  # (1, C, H, W) / (1, C, T, H, W)
    patches, grid = patchify(batch, options.patch_size)  # (N, C·p·p), (1, 3)
    t, h, w = (int(v) for v in grid[0])
    positions = video_patch_positions((t, h, w), None) if kind == "video" else grid_positions(grid)
    return LoadedItem(index, str(path), kind, patches.contiguous(), (t, h, w), positions)


def _loaders(options: LoadOptions) -> dict[str, Callable[[int, str], LoadedItem]]:
    full, draft = replace(options, jpeg_draft=False), replace(options, jpeg_draft=True)
    return {
        "baseline": lambda i, path: load_baseline(i, path, options),
        "full_decode": lambda i, path: load_item(i, path, full),
        "draft": lambda i, path: load_item(i, path, draft),
        "draft_norm": lambda i, path: _normalised(load_item(i, path, draft)),
    }


def _normalised(item: LoadedItem) -> LoadedItem:
    if not item.error:
        item.patches, item.normalization = item.float_patches(), None
    return item


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------


@dataclass
class PipelineSetup:
    """What :func:`run_pipeline_benchmark` measures (``hevc-vit bench --pipeline`` options)."""

    folder: str | None = None  # None: a synthetic set in a temporary folder
    preset: str | None = "small"  # the model whose processor (and, for the feature check, weights) is used
    model_path: str | None = None
    iters: int = 3  # timed loads per file and variant; the median counts
    features: bool = True  # run the model on the inputs the draft decode changed (feature cosine)
    images: int = 40  # synthetic set: JPEGs
    clips: int = 2  # synthetic set: clips (with PyAV)
    config_overrides: dict | None = None  # e.g. a smaller model, for tests


def time_loading(
    loaders: dict[str, Callable[[int, str], LoadedItem]], paths: list[Path], iters: int
) -> tuple[dict[str, list[float]], list[LoadedItem]]:
    """Median seconds per file of each loader (``iters`` loads each, the loaders taken round-robin on every file,
    the order rotated), and the first loader's item of every file."""
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    names, items = list(loaders), []
    for path in paths:
        times: dict[str, list[float]] = {name: [] for name in loaders}
        first = None
        for round_ in range(max(iters, 1)):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = time.perf_counter()
                item = loaders[name](0, str(path))
                times[name].append(time.perf_counter() - start)
                if item.error:
                    raise ValueError(f"{path}: {item.error}")
                first = item if name == names[0] else first
        for name in names:
            seconds[name].append(statistics.median(times[name]))
        items.append(first)
    return seconds, items


def run_pipeline_benchmark(setup: PipelineSetup, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time the loaders (:data:`VARIANTS`) on the folder (or a synthetic set); measure the draft decode's deviation."""
    with tempfile.TemporaryDirectory(prefix="hevc_vit_pipeline_") as tmp:
        if setup.folder is None:
            log(f"writing a synthetic set ({setup.images} JPEGs of 256..4000 px, {setup.clips} clips) to {tmp}")
            paths = make_synthetic_set(tmp, setup.images, setup.clips)
        else:
            paths = media_files(setup.folder)
            if not paths:
                raise ValueError(f"folder={setup.folder!r} holds no images or videos")
        model, name, _ = load_model(_model_spec(setup), torch.device("cpu"), torch.float32)
        processor = build_processor("native", model.config, setup.model_path)
        options = LoadOptions(processor, model.config.patch_size, model.config.num_channels)
        log(f"{len(paths)} files; timing {', '.join(VARIANTS)} ({setup.iters} loads per file each, one thread)")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what a loader worker runs with
        try:
            seconds, items = time_loading(_loaders(options), paths, setup.iters)
        finally:
            torch.set_num_threads(threads)
        deviation = draft_deviation(paths, options, model if setup.features else None)
    return {
        "variants": _throughput(seconds, items),
        "files": [
            {"path": p.name, "kind": it.kind, "tokens": it.num_tokens, "seconds": {k: v[i] for k, v in seconds.items()}}
            for i, (p, it) in enumerate(zip(paths, items))
        ],
        "draft_deviation": deviation,
        "processor": processor.to_dict(),
        "model": name,
        "folder": setup.folder or "synthetic",
        "iters": setup.iters,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _model_spec(setup: PipelineSetup):
    if setup.model_path or not setup.config_overrides:
        return setup.model_path or setup.preset
    torch.manual_seed(0)
    return HEVCViTPackingModel(HEVCViTConfig.from_preset(setup.preset, **setup.config_overrides))


def _throughput(seconds: dict[str, list[float]], items: list[LoadedItem]) -> dict[str, dict[str, Any]]:
    """Items/s and tokens/s of each loader, per kind and over all files, and the ratio to the baseline."""
    report: dict[str, dict[str, Any]] = {}
    for name, times in seconds.items():
        row: dict[str, Any] = {}
        for kind in ("image", "video", "all"):
            chosen = [(t, it) for t, it in zip(times, items) if kind in ("all", it.kind)]
            if not chosen:
                continue
            total = sum(t for t, _ in chosen)
            tokens = sum(it.num_tokens for _, it in chosen)
            base = sum(t for t, it in zip(seconds["baseline"], items) if kind in ("all", it.kind))
            row[kind] = {
                "items": len(chosen),
                "seconds": total,
                "items_per_s": len(chosen) / total,
                "tokens_per_s": tokens / total,
                "speedup_vs_baseline": base / total,
            }
        report[name] = row
    return report


def draft_deviation(paths: list[Path], options: LoadOptions, model=None) -> dict[str, Any]:
    """How far the draft decode moves the inputs it changes (JPEGs at least twice the resize target), next to
    a change of the same kind for scale: the same image saved again as a JPEG of quality 95, fully decoded.
    For both against the full decode: 8-bit pixel differences ``|a - b|`` over every sample of those images
    (max, mean, 99th percentile) and, with a model, the per-token cosine of their features."""
    processor, changed = options.processor, []
    for path in paths:
        image = None if path.suffix.lower() in VIDEO_EXTENSIONS else _opened(path)
        if image is None or image.format != "JPEG":
            continue
        size = processor.output_size(image.height, image.width)
        if not np.array_equal(processor.pixels(_opened(path, "full"), size), processor.pixels(image, size, draft=True)):
            changed.append(path)
    report: dict[str, Any] = {"images_changed": len(changed)}
    if not changed:
        return report
    patches = {variant: _patches(changed, options, variant) for variant in ("full", "draft", "resaved_q95")}
    levels = torch.tensor(processor.image_std if processor.do_normalize else [1.0] * options.num_channels)
    levels = levels.repeat_interleave(options.patch_size**2) / (processor.rescale_factor if processor.do_rescale else 1)
    for variant in ("draft", "resaved_q95"):
        diff = ((patches[variant][0] - patches["full"][0]).abs() * levels).flatten()  # in 8-bit levels
        report[variant] = {
            "pixel_levels": {
                "max": diff.max().item(),
                "mean": diff.mean().item(),
                "p99": float(np.percentile(diff.numpy(), 99)),
            }
        }
    if model is not None:
        features = {variant: _features(model, *patches[variant]) for variant in patches}
        for variant in ("draft", "resaved_q95"):
            report[variant]["feature_cosine"] = _cosine(features[variant], features["full"])
    return report


def _opened(path: Path, how: str = "lazy") -> Image.Image:
    """The file's image: opened (``lazy``), decoded (``full``), or decoded and saved again as a JPEG of quality 95
    (``resaved_q95``), opened."""
    image = Image.open(io.BytesIO(path.read_bytes()))
    if how == "lazy":
        return image
    image.load()
    if how == "full":
        return image
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return Image.open(buffer)


def _patches(paths: list[Path], options: LoadOptions, variant: str) -> tuple[torch.Tensor, list]:
    draft = variant == "draft"
    parts = [
        options.processor.patchify(_opened(p, "lazy" if draft else variant), options.patch_size, draft) for p in paths
    ]
    return torch.cat([x for x, _ in parts]), [grid for _, grid in parts]


def _features(model, patches: torch.Tensor, grids: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.inference_mode():
        last, pooled, _ = model.encode_packed(patches, PackingPlan.from_grid_thw(grids))
    return last, pooled


def _cosine(actual: tuple, reference: tuple) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(actual[0].float(), reference[0].float(), dim=-1)
    result = {"tokens": cos.numel(), "min": cos.min().item(), "mean": cos.mean().item()}
    if reference[1] is not None:
        pooled = torch.nn.functional.cosine_similarity(actual[1].float(), reference[1].float(), dim=-1)
        result["pooled_min"] = pooled.min().item()
    return result


def format_pipeline_report(report: dict[str, Any]) -> str:
    """The human-readable table of a :func:`run_pipeline_benchmark` report."""
    files = report["files"]
    tokens = sum(f["tokens"] for f in files)
    lines = [
        f"hevc-vit bench --pipeline — {report['folder']} ({len(files)} files, {tokens:,} tokens), one worker "
        f"(one thread), median of {report['iters']} loads per file; processor patch "
        f"{report['processor']['patch_size']}, {report['processor']['min_tokens']}..{report['processor']['max_tokens']}"
        " tokens per image",
        "",
        "| variant | kind | items | seconds | items/s | tokens/s | vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in report["variants"].items():
        for kind, r in rows.items():
            lines.append(
                f"| {name} | {kind} | {r['items']} | {r['seconds']:.3f} | {r['items_per_s']:.2f} | "
                f"{r['tokens_per_s']:,.0f} | {r['speedup_vs_baseline']:.2f}x |"
            )
    dev = report["draft_deviation"]
    lines.append("")
    if not dev["images_changed"]:
        lines.append("draft decode: no input was changed by it (no JPEG at least twice its resize target)")
        return "\n".join(lines)
    lines.append(f"against the full decode, on the {dev['images_changed']} images the draft decode changes:")
    for variant, what in (("draft", "draft decode"), ("resaved_q95", "for scale: saved again as JPEG q95")):
        px, cos = dev[variant]["pixel_levels"], dev[variant].get("feature_cosine")
        line = f"  {what:<36} |8-bit difference| max {px['max']:.0f}, mean {px['mean']:.2f}, p99 {px['p99']:.1f}"
        if cos:
            pooled = f", pooled min {cos['pooled_min']:.6f}" if "pooled_min" in cos else ""
            line += f"; feature cosine min {cos['min']:.5f}, mean {cos['mean']:.6f}{pooled}"
        lines.append(line)
    if dev["draft"].get("feature_cosine"):
        lines.append(f"  (features: {report['model']}, {dev['draft']['feature_cosine']['tokens']:,} tokens)")
    return "\n".join(lines)
