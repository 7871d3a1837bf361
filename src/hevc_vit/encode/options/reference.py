"""The reference page of ``hevc-vit encode``'s options, generated from :class:`EncodeOptions`.

The page is made from the same field metadata the command line's parser is made from
(``hevc_vit.cli.encode.add_option_arguments``): the flag and its metavar, the help text with its default, the
values the field's check accepts, and whether ``--resume`` compares the option. ``docs/gen_options.py`` writes it
to ``docs/encode/options.md``, and ``tests/test_docs.py`` fails when the committed page differs from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from hevc_vit.encode.options import EncodeOptions

REGENERATE = "python docs/gen_options.py"  # the command that rewrites the committed page
_RESUME = {"compare": "must match", "note": "recorded", None: ""}
_NOT_A_VALUE = object()  # no check accepts it, so a check answers with what it expects


def options_markdown() -> str:
    """The Markdown page: a short introduction, then one table row per field of :class:`EncodeOptions`."""
    fields = dataclasses.fields(EncodeOptions)
    lines = [
        "# Encode options",
        "",
        f"<!-- generated from hevc_vit.encode.options.EncodeOptions by `{REGENERATE}`: do not edit by hand -->",
        "",
        "Every option of `hevc-vit encode` and of `hevc_vit.encode.encode(inputs, out_dir, options, **overrides)` "
        "is a field of `hevc_vit.encode.EncodeOptions`, declared once in `src/hevc_vit/encode/options/`; the "
        "command line's flags are made from the same fields, and this page is generated from them.",
        "",
        _markdown(inspect.cleandoc(EncodeOptions.__doc__ or "")),
        "",
        "Columns: the flag (and the Python name), the field's default in Python (`None`: decided at run time, as "
        "the text says), the values its check accepts (a `ValueError` otherwise; the command line checks the same "
        "while it parses, exit 2), and what `--resume` does with it: *must match* (recorded in "
        "`encode_config.json`; a different value is refused), *recorded* (saved only).",
        "",
        "| option | default | accepts | `--resume` | what it does |",
        "|---|---|---|---|---|",
    ]
    lines += [_row(f) for f in fields]
    python_only = [f"`{f.name}`" for f in fields if not f.metadata["cli"]]
    lines += ["", f"Python only (objects and callbacks, no flag): {', '.join(python_only)}.", ""]
    return "\n".join(lines)


def _row(f: dataclasses.Field) -> str:
    meta = f.metadata
    name = _cell(f"`{f.name}`")
    if meta["cli"]:
        flag = "--" + f.name.replace("_", "-") + (f" {meta['metavar']}" if meta["metavar"] else "")
        name = f"{_cell(f'`{flag}`')}<br>{name}"  # the flag above the Python name, in one cell
    else:
        name = f"(Python) {name}"
    cells = [f"`{f.default!r}`", _accepts(meta), _RESUME[meta["record"]], meta["help"].format(default=f.default)]
    return "| " + " | ".join([name, *(_cell(c) for c in cells)]) + " |"


def _accepts(meta: dict[str, Any]) -> str:
    if meta["choices"]:
        return ", ".join(f"`{c}`" for c in meta["choices"])
    if meta["cli"] and meta["parse"] is None:
        return "a switch (off by default)"
    if meta["check"] is not None:
        return meta["check"](_NOT_A_VALUE)
    return "text" if meta["cli"] else "any"


def _markdown(docstring: str) -> str:
    """A docstring's reStructuredText roles and double backquotes as Markdown code: ``:class:`X``` -> `` `X` ``."""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", docstring).replace("``", "`")


def _cell(text: str) -> str:
    """A table cell on one line. Outside code spans, ``|`` is escaped (a table splits on it) and ``<``, ``>`` are
    entities (``DIR/<key>.png`` is no HTML tag); inside them Python-Markdown keeps both as they are."""
    parts = re.split(r"(`[^`]*`)", text.replace("\n", " "))
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "".join(parts)
