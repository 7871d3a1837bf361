"""The checks and parsers of option values on their own: a check returns "" or what was expected, a parser's
``ValueError`` names the text."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hevc_vit.encode.options.values import (
    MAX_PATCHES,
    MAX_SHARD_MB,
    boolean,
    codec_budget,
    comma_list,
    integer,
    kept_columns,
    names,
    on_off,
    one_of,
    option,
    optional,
    parse_budget,
    positive_int,
    positive_number,
    shard_size,
)
from hevc_vit.encode.output.formats import RESERVED_COLUMNS


@pytest.mark.parametrize(
    "check, good, bad, expected",
    [
        (integer(1, 5), [1, 5], [0, 6, True, 2.0, "3"], "an integer from 1 to 5"),
        (positive_int, [1, 10**9], [0, -1, False, 1.5], "a positive integer"),
        (boolean, [True, False], [0, 1, "true", None], "true or false"),
        (optional(positive_int), [None, 3], [0], "a positive integer"),
        (one_of(("a", "b")), ["a", "b"], ["c", None], "one of ('a', 'b')"),
        (codec_budget, [1, MAX_PATCHES, 0.125, 1.0], [0, MAX_PATCHES + 1, 0.0, 1.5, math.nan, True], "a patch count"),
        (positive_number, [0.5, 3], [0, -1.0, math.inf, math.nan, True], "a finite number > 0"),
        (shard_size, [0, 0.5, MAX_SHARD_MB], [-1, MAX_SHARD_MB + 1, math.inf, False], "a number from 0 to"),
        (names, ["a", ("a", "b"), ["x"]], ["", ("a", ""), 3, ("a", 1)], "a column name or a list"),
    ],
)
def test_checks_pass_the_valid_and_say_what_was_expected(check, good, bad, expected):
    for value in good:
        assert check(value) == "", value
    for value in bad:
        assert check(value).startswith(expected), value


def test_kept_columns_refuse_the_index_fields():
    assert kept_columns(["caption", "width"]) == ""
    clash = kept_columns(["caption", RESERVED_COLUMNS[0]])
    assert clash.startswith("column names other than the index fields") and f"(found {RESERVED_COLUMNS[0]})" in clash


def test_parsers():
    assert parse_budget("2048") == 2048 and isinstance(parse_budget(" 12 "), int)
    assert parse_budget("0.125") == 0.125
    with pytest.raises(ValueError, match="'lots'; expected a patch count"):
        parse_budget("lots")
    assert comma_list(" a, b,,c ") == ("a", "b", "c") and comma_list("") == ()
    assert [on_off(t) for t in ("on", "TRUE", " yes", "1", "off", "False", "no", "0")] == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="'maybe'; expected on or off"):
        on_off("maybe")


def test_option_declares_a_field_with_its_metadata():
    @dataclasses.dataclass
    class Options:
        workers: int = option(2, "processes (default {default})", parse=int, check=positive_int, record="note")

    (field,) = dataclasses.fields(Options)
    assert Options().workers == 2
    assert field.metadata["check"] is positive_int and field.metadata["record"] == "note"
    assert field.metadata["parse"] is int
