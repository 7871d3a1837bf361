"""``hevc-vit`` command line: a thin front that parses arguments and calls library functions.

Each sub-command lives in its own module, which provides ``register_cli(subparsers)``: it adds its
parser and sets ``run=<function(args) -> int>`` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMAND_MODULES = (
    "hevc_vit.encode",
    "hevc_vit.convert",
    "hevc_vit.bench",
    "hevc_vit.codec",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hevc-vit",
        description="HEVC ViT (OneVision) encoder in packing mode: native-resolution features for images and videos.",
    )
    parser.add_argument("--version", action="version", version=f"hevc-vit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:  # a command not shipped in this build
            continue
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
