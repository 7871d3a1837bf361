"""How an option of :class:`~hevc_vit.encode.EncodeOptions` (:mod:`.options`) is declared (:func:`option`), and
the parsers and checks of its values: a check takes a value and returns ``""`` when it is valid, else what was
expected; a parser turns command-line text into a value (its ``ValueError`` says what was expected)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import field
from typing import Any

from hevc_vit.encode.options.choices import RESERVED_COLUMNS


def integer(low: int, high: int) -> Callable[[Any], str]:
    """An integer from ``low`` to ``high``: the upper bounds are far above any real run and keep a typo (an extra
    zero or three) from reaching the allocator or the process table."""
    return lambda value: (
        ""
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        else (f"an integer from {low} to {high}")
    )


def positive_int(value: Any) -> str:
    return "" if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "a positive integer"


# upper bounds of the numeric options (see ``integer``)
MAX_PATCHES = 1 << 20  # patches of one image or clip: a 16384 x 16384 image at patch 16
MAX_FORWARD_TOKENS = 1 << 22  # patches of one forward
MAX_FRAMES = 4096
MAX_WORKERS = 256
MAX_SHARD_MB = 65536  # a shard is held in memory until it is written
MAX_RETRIES = 100


def boolean(value: Any) -> str:
    return "" if isinstance(value, bool) else "true or false"


def optional(check: Callable[[Any], str]) -> Callable[[Any], str]:
    """``check``, with None also valid."""
    return lambda value: "" if value is None else check(value)


def one_of(choices: tuple[Any, ...]) -> Callable[[Any], str]:
    return lambda value: "" if value in choices else f"one of {choices}"


def parse_budget(text: str) -> float | int:
    """``--codec-budget``: ``"2048"`` -> 2048 patches, ``"0.125"`` -> a ratio."""
    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ValueError(f"{text!r}; expected a patch count K >= 1 or a ratio in (0, 1]") from None


def codec_budget(value: Any) -> str:
    count = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PATCHES
    ratio = isinstance(value, float) and math.isfinite(value) and 0 < value <= 1
    return "" if count or ratio else f"a patch count K from 1 to {MAX_PATCHES} or a ratio in (0, 1]"


def comma_list(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def names(value: Any) -> str:
    """A column name, or a sequence of them."""
    values = (value,) if isinstance(value, str) else value
    valid = isinstance(values, (tuple, list)) and all(isinstance(v, str) and v for v in values)
    return "" if valid else "a column name or a list of column names"


def kept_columns(value: Any) -> str:
    """Column names, none of them a field the run writes in an index row itself (it would clash with it)."""
    invalid = names(value)
    if invalid:
        return invalid
    clash = [name for name in ((value,) if isinstance(value, str) else value) if name in RESERVED_COLUMNS]
    if clash:
        return f"column names other than the index fields {', '.join(RESERVED_COLUMNS)} (found {', '.join(clash)})"
    return ""


def on_off(text: str) -> bool:
    """A switch that is on by default: ``on``/``off`` (or true/false, yes/no, 1/0)."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{text!r}; expected on or off")


def positive_number(value: Any) -> str:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return "" if valid else "a finite number > 0"


def shard_size(value: Any) -> str:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    valid = number and math.isfinite(value) and 0 <= value <= MAX_SHARD_MB
    return "" if valid else f"a number from 0 to {MAX_SHARD_MB} (0: one shard per forward)"


def option(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], str] | None = None,
    record: str | None = None,
    cli: bool = True,
    before: Any = dataclasses.MISSING,
) -> Any:
    """A field of :class:`EncodeOptions` with what the command line and the checks need.

    help: one line; ``{default}`` in it becomes the default. parse: the argparse ``type`` (None with a
    ``False`` default: a flag). check: ``value -> ""`` when valid, else what was expected. record:
    ``"compare"`` (saved in ``encode_config.json``, must match on ``--resume``), ``"note"`` (saved only) or None.
    cli: False for options only Python callers can give (objects, callbacks). before: what runs made before the
    option existed did, when that is not its default (``--resume`` compares a folder that does not record it
    with this).
    """
    meta = dict(help=help, parse=parse, metavar=metavar, choices=choices, check=check, record=record, cli=cli)
    if before is not dataclasses.MISSING:
        meta["before"] = before
    return field(default=default, metadata=meta)
