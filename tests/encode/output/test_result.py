"""A run's result on its own: counts from the merged index, the summary, the exit status, the JSON."""

from __future__ import annotations

from pathlib import Path

from hevc_vit.encode.output.index import INDEX_NAME
from hevc_vit.encode.output.result import EncodeResult


def _rows():
    ok = [{"path": p, "status": "ok", "error": ""} for p in ("a", "b", "c")]
    failed = [{"path": p, "status": "failed", "error": f"no {p}"} for p in ("d", "e")]
    earlier = [{"path": "old", "status": "failed", "error": "gone"}]
    return ok + failed + earlier


def test_count_agrees_with_the_index():
    result = EncodeResult(Path("out"))
    result.count(_rows(), ["a", "b", "c", "d", "e"], done={"a", "d"})  # d failed again: it counts as failed
    assert (result.encoded, result.failed, result.skipped) == (2, 2, 1)
    assert [row["path"] for row in result.failures] == ["d", "e"]
    assert result.earlier_failures == 1
    assert result.index_path == Path("out") / INDEX_NAME


def test_summary_exit_status_and_json():
    result = EncodeResult(Path("out"), tokens=1000, seconds=2.0, shards=3, repairs=["fixed x"])
    result.count(_rows(), ["a", "b", "c", "d", "e"], done=set())
    text = result.summary()
    assert text.startswith("encoded 3 of 5 inputs (2 failed); 1,000 patches in 2.0 s: 2.50 items/s, 500 tokens/s")
    assert "  failed: d: no d" in text and "  repaired: fixed x" in text
    assert "1 failed rows of an earlier run's inputs" in text
    assert "features: out/shards/ (3 new shards); index: out/index.jsonl" in text
    assert result.exit_status() == 1 and result.exit_status(allow_failures=True) == 0
    summary = result.as_dict(max_failures=1)
    assert summary["failures"] == [{"path": "d", "error": "no d"}] and summary["encoded"] == 3
    nothing = EncodeResult(Path("out"))
    nothing.count(_rows()[3:5], ["d", "e"], done=set())
    assert nothing.nothing_encoded and nothing.exit_status(allow_failures=True) == 1
    assert "nothing was encoded" in nothing.summary()


def test_a_name_that_is_not_utf8_prints():
    result = EncodeResult(Path("out"))
    bad = b"\xff.jpg".decode("utf-8", "surrogateescape")
    result.count([{"path": bad, "status": "failed", "error": "x"}], [bad], done=set())
    assert "failed: \\xff.jpg: x" in result.summary()
    result.summary().encode("utf-8")  # no surrogate left: printable
