"""Seeds that are a pure function of a position in the run (seed, rank, epoch, step, ...)."""
from __future__ import annotations

import hashlib
import struct


def position_seed(*parts: int) -> int:
    """A 63-bit generator seed derived from integer parts, e.g. position_seed(seed, rank, epoch, step).

    The same in every process, Python version and platform: a BLAKE2b digest of the parts (Python's hash() of a
    tuple is an implementation detail that may change between versions). Distinct tuples give unrelated seeds,
    so a resumed run draws exactly what an uninterrupted one would at the same position."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
