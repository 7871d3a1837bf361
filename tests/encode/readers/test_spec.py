"""An input's spec and where its bytes are: tar member paths both ways."""

from __future__ import annotations

import pytest

from hevc_vit.encode.readers.spec import QUOTED_TAR_PREFIX, TAR_PREFIX, InputSpec, spec_path, split_tar_path, tar_path


@pytest.mark.parametrize(
    "member, shard",
    [
        ("000123.jpg", "/data/shard-00000.tar"),
        ("dir/a b.jpg", "s3://bucket/shards/00001.tar"),
        ("odd::name.jpg", "/data/s.tar"),  # "::" would split the chained URL
        ("ends-with:", "/data/s.tar"),  # a trailing ":" would move the split
        ("x.jpg", "/folder::with/s.tar"),  # a local shard holding "::"
        ("caf%C3%A9 ü.png", ":leading/s.tar"),
    ],
)
def test_tar_path_round_trips_and_quotes_only_what_fsspec_would_split(member, shard):
    path = tar_path(member, shard)
    assert split_tar_path(path) == (member, shard)
    plain = "::" not in member and not member.endswith(":") and "::" not in shard and not shard.startswith(":")
    assert path.startswith(TAR_PREFIX if plain else QUOTED_TAR_PREFIX)
    if plain:
        assert path == f"tar://{member}::{shard}"  # what fsspec.open reads as it is


@pytest.mark.parametrize("path", ["/data/a.jpg", "tar://no-separator", "s3://b/x.tar"])
def test_split_tar_path_names_a_path_that_is_no_member(path):
    with pytest.raises(ValueError, match="is not a tar member's path") as e:
        split_tar_path(path)
    assert repr(path) in str(e.value)


def test_spec_path_is_the_same_for_a_spec_and_its_path():
    assert spec_path(InputSpec("a.jpg")) == spec_path("a.jpg") == "a.jpg"
