"""``hevc-vit codec-assets``: the reference's codec-sparse training/evaluation assets (:mod:`hevc_vit.codec.assets`)."""

from __future__ import annotations

import argparse
import json
import sys

from hevc_vit.cli.codec_sources import expand_codec_inputs
from hevc_vit.cli.common import EXIT_FAILED, EXIT_OK, integer_in, number_in, run_guarded
from hevc_vit.codec.assets import ASSET_SIGNALS, MODES, AssetSettings, launcher_shard, write_assets
from hevc_vit.codec.assets.frames import WINDOW_PICKS
from hevc_vit.codec.assets.run import ENGINES
from hevc_vit.codec.assets.settings import MOSAIC_FORMATS
from hevc_vit.codec.config import NORMALIZE
from hevc_vit.encode.readers.memory import open_hf_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``codec-assets`` to the ``hevc-vit`` command line."""
    p = subparsers.add_parser(
        "codec-assets",
        help="write codec-selected patch mosaics + positions (the reference's LLaVA asset layout)",
        description="For every video of INPUTS write OUT/assets/<key>/ with mosaic_000.jpg... (or .png), "
        "positions_thw.npy, visible_indices.npy, frame_ids.npy and meta.json (the layout of the reference's "
        "offline_precompute_llava_codec_assets.py), OUT/index.jsonl (one row per input, ok or failed with a "
        "reason) and OUT/manifest.jsonl "
        "(training records: the input line's fields, images, positions_thw). Exit 1 when any input failed. Under "
        "torchrun every rank takes its shard of the inputs (index-RANK-of-WORLD.jsonl).",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUTS",
        help="videos, folders, globs, brace ranges, list files, webdataset .tar shards, .parquet/.csv/.tsv/.jsonl "
        "tables, URLs (https://, s3://, hf://, ...) as encode takes them; a local .jsonl is the reference's job list",
    )
    p.add_argument("--out", required=True, help="the output folder")
    p.add_argument(
        "--hf-dataset",
        metavar="PATH|NAME",
        help="also a Hugging Face dataset (save_to_disk folder or Hub name): one video a row, from --path-column "
        "(a path, URL or the video's bytes), keyed by --key-column",
    )
    p.add_argument("--split", metavar="NAME", help="--hf-dataset: the split (default: train, or the only one)")
    p.add_argument("--frames", type=integer_in(1, 4096), default=64, help="frames sampled per clip (default: 64)")
    p.add_argument("--num-images", type=integer_in(1, 1024), default=8, help="mosaics per clip (default: 8)")
    p.add_argument("--square-size", type=integer_in(1, 1 << 14), default=576, help="square side, px (default: 576)")
    p.add_argument("--patch-size", type=integer_in(1, 1024), default=16, help="patch side, px (default: 16)")
    p.add_argument("--jpeg-quality", type=integer_in(1, 100), default=95, help="mosaic JPEG quality (default: 95)")
    p.add_argument(
        "--mosaic-format",
        choices=MOSAIC_FORMATS,
        default="jpg",
        help="mosaic files: jpg (the reference's, lossy) or png (lossless: the selection's exact pixels)",
    )
    p.add_argument("--mode", choices=MODES, default="global", help="top-K over all frames or per time bucket")
    p.add_argument("--time-bucket-count", type=int, default=-1, help="time_bucket mode: buckets (-1: one a mosaic)")
    p.add_argument("--keep-mid-full-frame", action="store_true", help="also keep a whole middle frame")
    p.add_argument("--mid-full-frame-index", type=int, default=-1, help="its t (-1: frames // 2)")
    p.add_argument("--window-len", type=integer_in(0, 1 << 30), default=0, help="sample a window of N frames (0: all)")
    p.add_argument("--window-pick", choices=WINDOW_PICKS, default="none", help="where the window lies")
    p.add_argument(
        "--signals",
        default="aligned_difference",
        help=f"comma-separated, from {', '.join(ASSET_SIGNALS)} (motion_vectors: the decoder's, H.264/MPEG-2/MPEG-4; "
        "a frame without them is scored by the other signals, by aligned_difference when it is alone; the "
        "reference's fusion: motion_vectors,aligned_difference --normalize frame)",
    )
    p.add_argument("--normalize", choices=NORMALIZE, default="volume", help="signal normalisation (default: volume)")
    p.add_argument("--key-column", default="key", help="job-list/table column of the asset key (default: key)")
    p.add_argument(
        "--path-column", default="video", help="job-list/table column of the video path or URL (default: video)"
    )
    p.add_argument("--engine", choices=ENGINES, default="local", help="local processes or one Ray task a video")
    p.add_argument("--ray-address", help="the Ray cluster to use (default: a local instance on 127.0.0.1)")
    p.add_argument("--workers", type=integer_in(0, 1024), default=0, help="worker processes (default: 0, this one)")
    p.add_argument("--timeout", type=number_in(0, 1e9, low_open=True), help="seconds per video in a worker")
    p.add_argument(
        "--num-shards", type=integer_in(1, 1 << 20), help="split the jobs (default: torchrun's WORLD_SIZE, 1)"
    )
    p.add_argument("--shard-id", type=integer_in(0, 1 << 20), help="this process's shard (default: torchrun's RANK, 0)")
    p.add_argument("--resume", action="store_true", help="continue a run in OUT: finished keys are skipped")
    p.add_argument(
        "--preview", action="store_true", help="draw each selection beside its mosaics: OUT/previews/KEY.png"
    )
    p.add_argument("--allow-failures", action="store_true", help="exit 0 when some inputs fail")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``hevc-vit codec-assets``: 0 when every input was written, 1 when some failed, 2 for invalid input."""
    return run_guarded("codec-assets", lambda: _write(args))


def settings_of(args: argparse.Namespace) -> AssetSettings:
    """The :class:`AssetSettings` the options ask for."""
    return AssetSettings(
        frames=args.frames,
        num_images=args.num_images,
        square_size=args.square_size,
        patch_size=args.patch_size,
        jpeg_quality=args.jpeg_quality,
        mosaic_format=args.mosaic_format,
        mode=args.mode,
        time_bucket_count=args.time_bucket_count,
        keep_mid_full_frame=args.keep_mid_full_frame,
        mid_full_frame_index=args.mid_full_frame_index,
        window_len=args.window_len,
        window_pick=args.window_pick,
        signals=tuple(args.signals.split(",")),
        normalize=args.normalize,
    )


def _write(args: argparse.Namespace) -> int:
    shard_id, num_shards = launcher_shard()
    inputs: list = list(args.inputs)
    if args.hf_dataset is not None:
        inputs.append(open_hf_dataset(args.hf_dataset, args.split))
    elif args.split is not None:
        raise ValueError(f"--split {args.split} was given without --hf-dataset; it chooses a split of the dataset")
    if not inputs:
        raise ValueError("no input; expected INPUTS (videos, folders, tables, ...) or --hf-dataset")
    report = write_assets(
        expand_codec_inputs(inputs, args.path_column, args.key_column),
        args.out,
        settings_of(args),
        key_column=args.key_column,
        path_column=args.path_column,
        workers=args.workers,
        resume=args.resume,
        timeout=args.timeout,
        shard_id=shard_id if args.shard_id is None else args.shard_id,
        num_shards=num_shards if args.num_shards is None else args.num_shards,
        preview=args.preview,
        engine=args.engine,
        ray_address=args.ray_address,
    )
    if not args.quiet:
        for row in report.failed:
            print(f"hevc-vit codec-assets: failed: {row['key']!r} ({row['video']}): {row['error']}", file=sys.stderr)
    summary = dict(out=str(report.out), ok=len(report.ok), failed=len(report.failed), total=len(report.rows))
    print(json.dumps(summary))
    if report.failed and not (args.allow_failures and report.ok):
        return EXIT_FAILED
    return EXIT_OK
