"""RAM fills: determinism, the corpus generator's compressibility, files:/image: and their errors."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from livemig.errors import GuestError
from livemig.guest.fill import (
    BASE_PAGES,
    corpus_ratio,
    describe_fill,
    fill_pages,
    generate_base,
)


def pages(n: int, value: int = 0) -> np.ndarray:
    return np.full((n, 4096), value, dtype=np.uint8)


def zlib1_ratio(data: bytes, chunk: int = 512 << 10) -> float:
    out = sum(len(zlib.compress(data[i:i + chunk], 1)) for i in range(0, len(data), chunk))
    return len(data) / out


def test_zero_does_not_touch_pages() -> None:
    p = pages(4, 7)
    assert "zero" in fill_pages(p, "zero")
    assert (p == 7).all()


def test_random_is_deterministic_by_seed_and_incompressible() -> None:
    a, b, c = pages(300), pages(300), pages(300)
    fill_pages(a, "random", seed=5)
    fill_pages(b, "random", seed=5)
    fill_pages(c, "random", seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert corpus_ratio(a.tobytes()) < 1.01
    # the stream does not depend on how much is filled: a shorter fill is a prefix
    d = pages(257)
    fill_pages(d, "random", seed=5)
    assert np.array_equal(d, a[:257])


def test_corpus_ratio_is_silesia_like_on_32_mib() -> None:
    p = pages(8192)  # 32 MiB
    desc = fill_pages(p, "corpus", seed=0)
    assert "corpus" in desc
    data = p.tobytes()
    zstd1 = corpus_ratio(data)
    assert 3.0 <= zstd1 <= 3.5, zstd1
    z1 = zlib1_ratio(data)
    assert 2.9 <= z1 <= 3.2, z1
    zero_share = float((~p.any(axis=1)).mean())
    assert 0.01 <= zero_share <= 0.03, zero_share


def test_corpus_is_deterministic_and_seeded() -> None:
    a, b, c = pages(600), pages(600), pages(600)
    fill_pages(a, "corpus", seed=1)
    fill_pages(b, "corpus", seed=1)
    fill_pages(c, "corpus", seed=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_corpus_prefix_property_and_tile_copies_differ() -> None:
    n = 2 * BASE_PAGES + 37  # two tiles of the base and a partial segment
    big = pages(n)
    fill_pages(big, "corpus", seed=3)
    small = pages(BASE_PAGES + 5)
    fill_pages(small, "corpus", seed=3)
    assert np.array_equal(small, big[:BASE_PAGES + 5])
    # the second copy of the base is not a byte repeat of the first (no free matches for LZ)
    first, second = big[:BASE_PAGES], big[BASE_PAGES:2 * BASE_PAGES]
    nonzero = first.any(axis=1)
    assert not (first[nonzero] == second[nonzero]).all(axis=1).any()
    # but keeps its zero pages where the base has them
    assert np.array_equal(~first.any(axis=1), ~second.any(axis=1))


def test_corpus_base_is_cached_and_read_only() -> None:
    base, zeros = generate_base(0)
    assert base is generate_base(0)[0]
    assert base.size == BASE_PAGES * 4096
    assert not base.flags.writeable and not zeros.flags.writeable


def test_files_cycle_in_sorted_name_order(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"B" * 5000)
    (tmp_path / "a").write_bytes(bytes(range(256)) * 7)
    (tmp_path / "c-empty").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ignored").write_bytes(b"X" * 100)
    p = pages(5)
    desc = fill_pages(p, f"files:{tmp_path}")
    assert "3 files" in desc and "cycled" in desc
    period = np.frombuffer(bytes(range(256)) * 7 + b"B" * 5000, dtype=np.uint8)
    assert np.array_equal(p.reshape(-1), np.resize(period, p.size))


def test_files_shorter_ram_takes_a_prefix(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(bytes(range(256)) * 40)  # 10240 bytes > 2 pages
    p = pages(2)
    fill_pages(p, f"files:{tmp_path}")
    assert p.tobytes() == (bytes(range(256)) * 40)[:8192]


def test_files_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match=str(tmp_path / "missing")):
        fill_pages(pages(1), f"files:{tmp_path / 'missing'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GuestError, match=f"{empty}.*no regular file"):
        fill_pages(pages(1), f"files:{empty}")


def test_image_is_copied_and_the_rest_left_zero(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    content = np.random.default_rng(1).integers(0, 256, 6000, dtype=np.uint8).tobytes()
    img.write_bytes(content)
    p = pages(4)
    desc = fill_pages(p, f"image:{img}")
    assert "6000 bytes" in desc
    flat = p.reshape(-1)
    assert flat[:6000].tobytes() == content
    assert not flat[6000:].any()


def test_image_errors(tmp_path: Path) -> None:
    img = tmp_path / "big.img"
    img.write_bytes(b"\1" * (4096 * 2 + 1))
    with pytest.raises(GuestError, match="larger than guest RAM"):
        fill_pages(pages(2), f"image:{img}")
    with pytest.raises(GuestError, match="nope.img"):
        fill_pages(pages(2), f"image:{tmp_path / 'nope.img'}")


def test_bad_specs_and_arrays() -> None:
    with pytest.raises(GuestError, match="unknown fill 'bogus'"):
        fill_pages(pages(1), "bogus")
    with pytest.raises(GuestError, match="missing path"):
        fill_pages(pages(1), "files:")
    with pytest.raises(GuestError, match="uint8"):
        fill_pages(np.zeros((2, 512), dtype=np.uint64), "random")
    with pytest.raises(GuestError, match="unknown fill"):
        describe_fill("corpus2")


def test_describe_fill() -> None:
    assert describe_fill("corpus").startswith("corpus:")
    assert "zstd-1" in describe_fill("corpus")
    assert describe_fill("files:/x").startswith("files:")
    assert "/y" in describe_fill("image:/y")


def test_corpus_ratio_measures() -> None:
    assert corpus_ratio(bytes(1 << 20)) > 100
    with pytest.raises(GuestError):
        corpus_ratio(b"")


def test_corpus_threads_do_not_change_the_content() -> None:
    from livemig.guest.fill import fill_corpus

    n = 3 * BASE_PAGES + 100 + 5  # several tiles, a partial segment at the end
    a, b = pages(n), pages(n)
    fill_corpus(a, 11, threads=1)
    fill_corpus(b, 11, threads=3)
    assert np.array_equal(a, b)
