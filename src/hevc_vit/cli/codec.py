"""``hevc-vit codec-preview``: draw the patches codec-aligned selection keeps (:mod:`hevc_vit.codec`)."""

from __future__ import annotations

import argparse
import json

from ..codec import NORMALIZE, SIGNALS, CodecSparseConfig, render_preview, select_patches
from .common import EXIT_OK, run_guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``codec-preview`` to the ``hevc-vit`` command line."""
    p = subparsers.add_parser(
        "codec-preview",
        help="draw the patches codec-aligned selection keeps, as a contact sheet",
        description="Select the changing patches of VIDEO (see hevc_vit.codec) and draw the sampled frames as a "
        "PNG contact sheet, kept patches bright and the others dimmed. Prints the selection summary as JSON.",
    )
    p.add_argument("video", help="a video file")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--patch-size", type=int, default=16, help="the model's patch size (default: 16)")
    p.add_argument("--frames", type=int, default=64, help="frames sampled over the clip (default: 64)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of the dense patches kept (default: 0.125)")
    budget.add_argument("--tokens", type=int, help="number of patches kept")
    budget.add_argument("--budget-frames", type=float, help="patches kept, in whole-frame equivalents")
    p.add_argument("--signals", default="aligned_difference", help=f"comma-separated, from {', '.join(SIGNALS)}")
    p.add_argument("--normalize", choices=NORMALIZE, default="volume", help="signal normalisation (default: volume)")
    p.add_argument("--no-keep-first-frame", action="store_true", help="do not keep the first frame whole")
    p.add_argument("--size", help="frame size HxW in pixels, multiples of the patch size (default: the video's)")
    p.add_argument("--max-tokens-per-frame", type=int, help="shrink the default frame size to this many patches")
    p.add_argument("--columns", type=int, default=8, help="frames per row of the sheet (default: 8)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``hevc-vit codec-preview``: 0 when the sheet was written, 2 for invalid input."""
    return run_guarded("codec-preview", lambda: _preview(args))


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"HxW"`` -> ``(H, W)``; None stays None."""
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 2:
        raise ValueError(f"--size {text!r}; expected HxW, e.g. 224x224")
    return size


def _preview(args: argparse.Namespace) -> int:
    budget = args.tokens if args.tokens is not None else args.ratio
    config = CodecSparseConfig(
        frames=args.frames,
        budget=budget,
        budget_frames=args.budget_frames,
        keep_first_frame=not args.no_keep_first_frame,
        signals=tuple(args.signals.split(",")),
        normalize=args.normalize,
        size=parse_size(args.size),
        max_tokens_per_frame=args.max_tokens_per_frame,
    )
    selection = select_patches(args.video, args.patch_size, config)
    render_preview(args.video, selection, args.output, columns=args.columns)
    print(json.dumps({"preview": str(args.output), **selection.summary()}))
    return EXIT_OK
