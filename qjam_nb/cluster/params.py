"""The params of a call as shipped: their digest, to tell calls' params apart (timeline, replay).

Rules: pure (no I/O, no state); reads the pickle and its out-of-band buffers in place, never copies them.
"""

from __future__ import annotations

from ..codec import digest_of


def params_hash(params_part: tuple) -> str:
    """XXH3-128 of the params as shipped (their pickle and out-of-band buffers), to tell calls' params apart.
    A call's params carry it already (``codec.Pickled.digest``): this is for a (pickle, buffers) pair."""
    return digest_of(params_part[0], params_part[1])
