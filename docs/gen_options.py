"""Write docs/encode/options.md from hevc_vit.encode.EncodeOptions: ``python docs/gen_options.py``.

The page is generated, never edited by hand; tests/test_docs.py fails when the committed page is stale.
"""

from __future__ import annotations

from pathlib import Path

from hevc_vit.encode.options.reference import options_markdown

PAGE = Path(__file__).resolve().parent / "encode" / "options.md"

if __name__ == "__main__":
    PAGE.write_text(options_markdown(), encoding="utf-8")
    print(f"wrote {PAGE}")
