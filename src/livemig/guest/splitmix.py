"""splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014): the
one home of its constants and finaliser, used by the fill patterns, the portable counter's chain
seeds and the reference of the KVM counter program (``kvm/programs/counter.asm`` computes the same
finaliser in the guest).
"""

from __future__ import annotations

import numpy as np

#: the golden-ratio increment of the splitmix64 sequence
GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1


def mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of every element of ``z`` (uint64 array of any shape, same shape out)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def splitmix64(z: int) -> int:
    """The next output of a splitmix64 generator whose state is ``z``: ``mix64(z + GAMMA)``."""
    return int(mix64(np.array([(z + GAMMA) & _M64], dtype=np.uint64))[0])
