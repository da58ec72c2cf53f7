"""State records synced by version and digest, moved as deltas. Pure functions, no I/O.

Each node publishes one state record (a CBOR map: its service catalogue, demand, ready
units, ...). Heartbeats do not carry it: they carry its *version* (grows by one each
time the content changes, within one incarnation) and an 8-byte *digest* (SHA-256 of
its canonical CBOR). The record itself moves only when it changes:

* the heartbeat that first announces a new version carries the *delta* from the
  previous version (top-level keys set, keys removed): peers that held the previous
  version apply it at once;
* a peer that holds anything else (it just joined, or lost that heartbeat) asks the
  owner with ``sget`` (``have``: the version it holds); the owner answers with a delta
  from that version when it still remembers it (``HISTORY`` versions), else the full
  record;
* after applying, the receiver checks the digest; a mismatch discards what it held and
  the next heartbeat triggers a full fetch.

So a quiet cluster sends only heartbeats, and a busy one sends each change once per
peer, not the whole record five times a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

DIGEST_BYTES = 8
HISTORY = 8  # past versions an owner can still answer with a delta


def digest(record: Mapping[str, Any]) -> bytes:
    """Fingerprint of a record's content, independent of key order."""
    return hashlib.sha256(cbor2.dumps(dict(record), canonical=True)).digest()[:DIGEST_BYTES]


EMPTY_DIGEST = digest({})


@dataclass(frozen=True)
class Published:
    """An owner's record, its version and the few versions before it (for deltas)."""

    version: int = 0
    record: Mapping[str, Any] = field(default_factory=dict)
    digest: bytes = EMPTY_DIGEST
    history: tuple[tuple[int, Mapping[str, Any]], ...] = ()  # oldest first


def publish(pub: Published, record: Mapping[str, Any]) -> Published:
    """The owner's next state: a new version only when the content changed."""
    fingerprint = digest(record)
    if fingerprint == pub.digest:
        return pub
    history = (*pub.history, (pub.version, pub.record))[-HISTORY:]
    return Published(pub.version + 1, dict(record), fingerprint, history)


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Top-level keys whose value differs (or is new) in ``new``, and keys it dropped."""
    changed = {k: v for k, v in new.items() if k not in old or old[k] != v}
    return changed, sorted(k for k in old if k not in new)


def answer(pub: Published, have: int | None) -> dict[str, Any]:
    """The update that brings a holder of version ``have`` (None: nothing) to ``pub``."""
    update: dict[str, Any] = {"sv": pub.version, "sd": pub.digest}
    if have == pub.version:
        return update
    base = dict(pub.history).get(have) if have is not None else None
    if base is None:
        update["full"] = dict(pub.record)
        return update
    changed, removed = diff(base, pub.record)
    update.update(base=have, set=changed, rm=removed)
    return update


@dataclass(frozen=True)
class Held:
    """What a receiver holds of one peer's record (one incarnation of it)."""

    version: int
    record: Mapping[str, Any]
    digest: bytes


def parse_announcement(msg: Mapping[str, Any]) -> tuple[int, bytes]:
    """(version, digest) from a heartbeat or update; ValueError when malformed."""
    version, fingerprint = msg.get("sv"), msg.get("sd")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63:
        raise ValueError(f"state version {version!r} is not a non-negative integer")
    if not isinstance(fingerprint, bytes) or len(fingerprint) != DIGEST_BYTES:
        raise ValueError(f"state digest must be {DIGEST_BYTES} bytes")
    return version, fingerprint


def apply_update(held: Held | None, update: Mapping[str, Any]) -> Held | None:
    """Fold one update into what is held; None when it cannot apply (wrong base,
    digest mismatch, malformed): the caller then fetches the full record."""
    try:
        version, fingerprint = parse_announcement(update)
    except ValueError:
        return None
    if "full" in update:
        full = update["full"]
        if not isinstance(full, Mapping):
            return None
        record = dict(full)
    elif "base" in update:
        changed, removed = update.get("set"), update.get("rm")
        if (held is None or update["base"] != held.version or not isinstance(changed, Mapping)
                or not isinstance(removed, list)):
            return None
        record = {**held.record, **changed}
        for key in removed:
            record.pop(key, None)
    else:
        return held if held is not None and held.version == version else None
    if digest(record) != fingerprint:
        return None
    return Held(version, record, fingerprint)


def is_current(held: Held | None, version: int, fingerprint: bytes) -> bool:
    """Whether what is held matches what the owner announces."""
    return held is not None and held.version == version and held.digest == fingerprint
