"""splitmix64: the published sequence, and the vectorised finaliser against plain integers."""

from __future__ import annotations

import numpy as np

from livemig.guest.splitmix import GAMMA, mix64, splitmix64

M64 = (1 << 64) - 1


def test_splitmix64_from_state_zero_gives_the_published_sequence() -> None:
    # the first outputs of the reference C implementation (Vigna's splitmix64.c) seeded with 0
    z, out = 0, []
    for _ in range(3):
        out.append(splitmix64(z))
        z = (z + GAMMA) & M64
    assert out == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_mix64_matches_plain_python_elementwise() -> None:
    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    zs = [0, 1, GAMMA, M64, 0x0123456789ABCDEF]
    got = mix64(np.array(zs, dtype=np.uint64).reshape(5, 1))
    assert got.shape == (5, 1)
    assert [int(v) for v in got.reshape(-1)] == [mix(z) for z in zs]
