"""The content of an input that is not a plain local file, from its reference (:class:`.spec.ItemRef`): a member
of a tar shard or a URL read as :mod:`.remote` says, a row of an in-memory collection (:mod:`.memory`).

Apart from :mod:`.spec` because a memory row's content comes from :mod:`.memory`, which builds on :mod:`.spec`.
"""

from __future__ import annotations

from typing import Any

from hevc_vit.encode.readers.memory import fetch_memory_row
from hevc_vit.encode.readers.remote import Network, read_location
from hevc_vit.encode.readers.spec import Fetched, ItemRef, MemoryRow, RemoteFile, TarMember


def fetch(ref: ItemRef, memory: list[Any], network: Network) -> Fetched:
    """The content ``ref`` points at. A URL is read as ``network`` says (timeouts, retries); what cannot be read
    raises (the loader records the reason as the input's failure)."""
    if isinstance(ref, TarMember):
        return Fetched(ref.name, data=read_location(ref.shard, network, ref.offset, ref.size))
    if isinstance(ref, RemoteFile):
        return Fetched(ref.url, data=read_location(ref.url, network))
    if isinstance(ref, MemoryRow):
        return fetch_memory_row(memory[ref.source], ref.row, network)
    raise TypeError(f"ref is a {type(ref).__name__}; expected a TarMember, RemoteFile or MemoryRow")
