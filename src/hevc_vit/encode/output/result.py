"""What an ``hevc-vit encode`` run did, and its summary for people."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hevc_vit.encode.output.formats import FOLDERS
from hevc_vit.encode.output.index import INDEX_NAME, SHARD_DIR


@dataclass
class EncodeResult:
    """What a run did. ``rows`` is the merged index (rank 0; empty on other ranks)."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    encoded: int = 0  # inputs encoded by this run, all ranks
    failed: int = 0  # inputs that failed in this run, all ranks
    skipped: int = 0  # inputs already done by an earlier run (--resume)
    tokens: int = 0  # patches encoded by this run, all ranks
    seconds: float = 0.0
    shards: int = 0  # shards written by this run, all ranks
    repairs: list[str] = field(default_factory=list)  # what --resume found damaged and redid (rank 0)
    output_format: str = "safetensors"  # where the features are: shards/, or embeddings/ + metadata/, or parts/
    inputs: int | None = None  # the first ``inputs`` rows are this run's inputs; the rest an earlier run's

    def count(self, rows: list[dict[str, Any]], paths: list[str], done: set[str]) -> None:
        """Take the merged index ``rows`` (this run's ``paths`` first, in order) and count from it, so that the
        summary agrees with the index: ``done`` holds the inputs an earlier run had encoded."""
        self.rows, self.inputs = rows, len(paths)
        mine = rows[: len(paths)]
        self.skipped = sum(1 for row in mine if row["status"] == "ok" and row["path"] in done)
        self.failed = sum(1 for row in mine if row["status"] != "ok")
        self.encoded = len(mine) - self.failed - self.skipped

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The failed rows of this run's inputs."""
        return [row for row in self.rows[: self.inputs] if row["status"] != "ok"]

    @property
    def earlier_failures(self) -> int:
        """Failed rows kept from an earlier run, of inputs this run was not given."""
        return sum(1 for row in self.rows[self.inputs :] if row["status"] != "ok") if self.inputs is not None else 0

    @property
    def index_path(self) -> Path:
        return self.out_dir / INDEX_NAME

    def summary(self) -> str:
        secs = max(self.seconds, 1e-9)
        done = self.encoded + self.failed
        speed = f": {done / secs:.2f} items/s, {self.tokens / secs:,.0f} tokens/s" if self.encoded else ""  # no work
        lines = [
            f"encoded {self.encoded} of {done} inputs ({self.failed} failed"
            + (f", {self.skipped} already done before --resume" if self.skipped else "")
            + f"); {self.tokens:,} patches in {self.seconds:.1f} s{speed}",
        ]
        failures = self.failures
        for row in failures[:10]:
            lines.append(f"  failed: {_printable(row['path'])}: {_printable(row['error'])}")
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more failed inputs (status 'failed' in the index)")
        if self.earlier_failures:
            lines.append(
                f"  {self.earlier_failures} failed rows of an earlier run's inputs, not given to this run, stay in "
                f"the index"
            )
        for repair in self.repairs:
            lines.append(f"  repaired: {_printable(repair)}")
        if self.nothing_encoded:
            lines.append("nothing was encoded: every input failed (see the reasons above and in the index)")
        elif self.failed:
            lines.append(
                f"{self.failed} input{'s' if self.failed != 1 else ''} failed: each has a row with status 'failed' "
                f"and the reason in {_printable(str(self.index_path))}"
            )
        out_dir = _printable(str(self.out_dir))
        where = " + ".join(f"{out_dir}/{folder}/" for folder in FOLDERS.get(self.output_format, (SHARD_DIR,)))
        lines.append(f"features: {where} ({self.shards} new shards); index: {out_dir}/{INDEX_NAME}")
        return "\n".join(lines)

    @property
    def nothing_encoded(self) -> bool:
        """Every input of the run failed (none encoded, none done before): the CLI exits with status 1."""
        return self.encoded == 0 and self.skipped == 0

    def exit_status(self, allow_failures: bool = False) -> int:
        """The command's status: 0 when every input is encoded, 1 when at least one failed (with
        ``allow_failures``: only when every input failed)."""
        if self.nothing_encoded or (self.failed and not allow_failures):
            return 1
        return 0

    def as_dict(self, max_failures: int = 100) -> dict[str, Any]:
        """The summary for scripts (``--json``): the counts, where the output is, the first ``max_failures``
        failures (``path``, ``error``)."""
        failures = [{"path": row["path"], "error": row["error"]} for row in self.failures]
        return {
            "out_dir": str(self.out_dir),
            "index": str(self.index_path),
            "encoded": self.encoded,
            "failed": self.failed,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "shards": self.shards,
            "output_format": self.output_format,
            "failures": failures[:max_failures],
            "earlier_failures": self.earlier_failures,
            "repairs": list(self.repairs),
        }


def _printable(text: Any) -> str:
    """``text`` safe to print on any terminal: a file name that is not valid UTF-8 (held by Python as
    surrogate escapes) shows its bytes as ``\\xNN`` instead of making ``print`` raise."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) else str(text)
