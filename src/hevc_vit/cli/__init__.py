"""``hevc-vit`` command line: thin front ends that parse arguments and call library functions.

Each command lives in a module of this package (:data:`COMMANDS`) that provides ``register(subparsers)``:
it adds its parser and sets ``run=<function(args) -> int>`` as the parser default. The exit statuses and
the error line every command shares are in :mod:`hevc_vit.cli.common`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from hevc_vit import __version__
from hevc_vit.cli.common import ArgumentParser

COMMANDS = (
    "hevc_vit.cli.encode",
    "hevc_vit.cli.convert",  # convert and info
    "hevc_vit.cli.bench",
    "hevc_vit.cli.codec",  # codec-preview
    "hevc_vit.cli.codec_assets",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(  # no abbreviations; its subparsers are ArgumentParsers too
        prog="hevc-vit",
        description="HEVC ViT (OneVision) encoder in packing mode: native-resolution features for images and videos.",
    )
    parser.add_argument("--version", action="version", version=f"hevc-vit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if importlib.util.find_spec(name) is None:  # a command not shipped in this build
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns its exit status. An option the
    command does not have exits with status 2 and the closest one it has."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)
