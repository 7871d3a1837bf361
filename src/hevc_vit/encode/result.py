"""What an ``hevc-vit encode`` run did, and its summary for people."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .index import INDEX_NAME, SHARD_DIR


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

    @property
    def index_path(self) -> Path:
        return self.out_dir / INDEX_NAME

    def summary(self) -> str:
        secs = max(self.seconds, 1e-9)
        done = self.encoded + self.failed
        lines = [
            f"encoded {self.encoded} of {done} inputs ({self.failed} failed"
            + (f", {self.skipped} already done before --resume" if self.skipped else "")
            + f"); {self.tokens:,} patches in {self.seconds:.1f} s: {done / secs:.2f} items/s, "
            f"{self.tokens / secs:,.0f} tokens/s",
        ]
        failures = [row for row in self.rows if row["status"] != "ok"]
        for row in failures[:10]:
            lines.append(f"  failed: {_printable(row['path'])}: {_printable(row['error'])}")
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more failed inputs (status 'failed' in the index)")
        for repair in self.repairs:
            lines.append(f"  repaired: {_printable(repair)}")
        if self.nothing_encoded:
            lines.append("nothing was encoded: every input failed (see the reasons above and in the index)")
        out_dir = _printable(str(self.out_dir))
        lines.append(f"features: {out_dir}/{SHARD_DIR}/ ({self.shards} new shards); index: {out_dir}/{INDEX_NAME}")
        return "\n".join(lines)

    @property
    def nothing_encoded(self) -> bool:
        """Every input of the run failed (none encoded, none done before): the CLI exits with status 1."""
        return self.encoded == 0 and self.skipped == 0


def _printable(text: Any) -> str:
    """``text`` safe to print on any terminal: a file name that is not valid UTF-8 (held by Python as
    surrogate escapes) shows its bytes as ``\\xNN`` instead of making ``print`` raise."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) else str(text)
