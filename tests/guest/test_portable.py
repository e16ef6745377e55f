"""The portable guest: dirty log vs RAM diff, pause, the counter's check, save/load continuation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest

from livemig.errors import GuestError
from livemig.guest import GuestConfig, create_guest
from livemig.guest import portable_workloads as wl
from livemig.guest.portable import PortableGuest

MEM = 8 << 20  # 2048 pages


def config(**kw: object) -> GuestConfig:
    base: dict[str, object] = {"kind": "portable", "memory": MEM, "smp": 1, "workload": "idle",
                               "dirty_rate": 20000, "working_set": 0, "fill": "zero", "seed": 0}
    base.update(kw)
    return GuestConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def guests() -> Iterator[list[PortableGuest]]:
    made: list[PortableGuest] = []
    yield made
    for g in made:
        g.close()


def make(guests: list[PortableGuest], incoming: bool = False, **kw: object) -> PortableGuest:
    g = create_guest(config(**kw), incoming=incoming)
    assert isinstance(g, PortableGuest)
    guests.append(g)
    return g


def run_until(g: PortableGuest, progress: int, timeout: float = 10.0) -> None:
    """Let the guest run until its progress reaches ``progress`` (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while g.progress() < progress:
        assert time.monotonic() < deadline, f"guest stuck at progress {g.progress()}"
        time.sleep(0.005)


def test_shape_and_kind(guests: list[PortableGuest]) -> None:
    g = make(guests, fill="random")
    assert g.kind == "portable"
    assert [b.name for b in g.blocks] == ["pc.ram"]
    assert g.ram_size == MEM and g.blocks[0].pages.shape == (MEM // 4096, 4096)
    assert not g.running
    assert g.describe()["kind"] == "portable"


def test_destination_is_zero_and_idle(guests: list[PortableGuest]) -> None:
    g = make(guests, incoming=True, workload="counter", fill="corpus")
    assert not g.blocks[0].pages.any()
    assert not g.running
    assert g.progress() == 0


def test_dirty_log_is_exactly_the_ram_diff(guests: list[PortableGuest]) -> None:
    g = make(guests, workload="dirty", dirty_rate=50000, fill="corpus", smp=2)
    ram = g.blocks[0].pages
    g.start_dirty_log()
    before = ram.copy()
    g.start()
    run_until(g, 3000)
    g.pause()
    log = g.sync_dirty_log()["pc.ram"]
    assert log.dtype == np.int64
    assert np.all(np.diff(log) > 0)
    changed = np.flatnonzero((ram != before).any(axis=1))
    assert np.array_equal(log, changed)
    assert 0 in log  # the header page
    # a second round: only pages written since the sync
    before = ram.copy()
    g.resume()
    run_until(g, g.progress() + 500)
    g.pause()
    log2 = g.sync_dirty_log()["pc.ram"]
    assert np.array_equal(log2, np.flatnonzero((ram != before).any(axis=1)))


def test_dirty_working_set_bounds_the_writes(guests: list[PortableGuest]) -> None:
    g = make(guests, workload="dirty", dirty_rate=0, working_set=64)
    g.start_dirty_log()
    g.start()
    run_until(g, 5000)
    g.pause()
    log = g.sync_dirty_log()["pc.ram"]
    assert log.min() == 0 and log.max() <= 64
    assert log.size == 65  # every page of a small working set, plus the header


def test_pause_stops_every_write(guests: list[PortableGuest]) -> None:
    g = make(guests, workload="dirty", dirty_rate=0, smp=2)
    g.start_dirty_log()
    g.start()
    run_until(g, 10000)
    g.pause()
    assert not g.running
    g.sync_dirty_log()
    snap = g.blocks[0].pages.copy()
    p = g.progress()
    time.sleep(0.05)
    assert np.array_equal(snap, g.blocks[0].pages)
    assert g.sync_dirty_log()["pc.ram"].size == 0
    assert g.progress() == p
    g.resume()
    assert g.running
    run_until(g, p + 1)


def test_idle_touches_nothing(guests: list[PortableGuest]) -> None:
    g = make(guests, workload="idle", fill="random")
    snap = g.blocks[0].pages.copy()
    g.start_dirty_log()
    g.start()
    time.sleep(0.02)
    g.pause()
    assert np.array_equal(snap, g.blocks[0].pages)
    assert g.sync_dirty_log()["pc.ram"].size == 0
    assert g.progress() == 0
    g.check_workload()


def test_counter_check_passes_then_fails_after_corruption(guests: list[PortableGuest]) -> None:
    g = make(guests, workload="counter", dirty_rate=0, working_set=100, smp=2, seed=9)
    g.start()
    run_until(g, 2000)
    g.pause()
    n = g.progress()
    assert n >= 2000
    g.check_workload()
    # corrupt the slot of vCPU 1's last step
    h = wl.read_header(g.blocks[0].pages)
    last = h.n[1] - 1
    page = h.ws_start + last % h.ws
    w = wl.words(g.blocks[0].pages)
    w[page, 1] ^= np.uint64(1)
    with pytest.raises(GuestError, match=f"vCPU 1: step {last} \\(page {page}"):
        g.check_workload()
    w[page, 1] ^= np.uint64(1)
    g.check_workload()
    # corrupt the header's value of vCPU 0
    w[0, 9] ^= np.uint64(1 << 40)
    with pytest.raises(GuestError, match="vCPU 0: header value"):
        g.check_workload()


def test_counter_check_of_a_running_guest_sees_no_torn_state(guests: list[PortableGuest]) -> None:
    # check_workload() on a running guest (the destination's --run-after report does this) used to
    # read the header, then the pages, while a batch wrote values of steps the header did not count
    # yet: with a working set smaller than one batch nearly every other check failed.
    g = make(guests, workload="counter", dirty_rate=0, working_set=64, smp=2, seed=3)
    g.start()
    run_until(g, 1000)
    for _ in range(300):
        g.check_workload()
    assert g.running
    before = g.progress()
    run_until(g, before + 1000)  # still stepping after the checks
    g.pause()
    g.check_workload()


def test_counter_matches_an_independent_replay(guests: list[PortableGuest]) -> None:
    g = make(guests, workload="counter", dirty_rate=0, working_set=50, seed=4)
    g.start()
    run_until(g, 300)
    g.pause()
    n = g.progress()
    x = wl.counter_x0(4, 0)
    vals = []
    for _ in range(n):  # the chain, step by step, in plain Python
        x = (wl.LCG_A * x + wl.LCG_C) % 2**64
        vals.append(x)
    w = wl.words(g.blocks[0].pages)
    assert int(w[0, 9]) == x
    for step in range(n - 50, n):
        assert int(w[1 + step % 50, 0]) == int(wl.fmix(np.array([vals[step]], dtype=np.uint64))[0])


def test_save_load_continues_the_counter_without_gap_or_repeat(guests: list[PortableGuest]) -> None:
    kw: dict[str, object] = {"workload": "counter", "dirty_rate": 0, "working_set": 1000, "seed": 3, "smp": 2}
    src = make(guests, **kw)
    src.start()
    run_until(src, 1500)
    src.pause()
    blob = src.save_state()
    n_src = src.progress()
    steps_src = wl.read_header(src.blocks[0].pages).n
    dst = make(guests, incoming=True, **kw)
    dst.blocks[0].pages[:] = src.blocks[0].pages
    dst.load_state(blob)
    assert dst.progress() == n_src
    dst.check_workload()
    dst.resume()
    run_until(dst, n_src + 1500)
    dst.pause()
    steps_dst = wl.read_header(dst.blocks[0].pages).n
    assert all(b > a for a, b in zip(steps_src, steps_dst, strict=True))
    # the check covers the last 1000 steps of each vCPU: some from the source, some from here
    dst.check_workload()
    # and the source, had it not been migrated, would have produced the same chain
    src.resume()
    run_until(src, dst.progress())
    src.pause()
    hs, hd = wl.read_header(src.blocks[0].pages), wl.read_header(dst.blocks[0].pages)
    for cpu in range(2):
        assert wl.lcg_jump(wl.counter_x0(3, cpu), hd.n[cpu]) == hd.x[cpu]
        assert wl.lcg_jump(wl.counter_x0(3, cpu), hs.n[cpu]) == hs.x[cpu]


def test_resume_refuses_a_destination_without_workload_state(guests: list[PortableGuest]) -> None:
    dst = make(guests, incoming=True, workload="counter")
    with pytest.raises(GuestError, match="magic"):
        dst.resume()
    assert not dst.running


def test_save_load_state_round_trip_and_errors(guests: list[PortableGuest]) -> None:
    src = make(guests, workload="dirty", dirty_rate=0)
    src.start()
    run_until(src, 1000)
    with pytest.raises(GuestError, match="running"):
        src.save_state()
    src.pause()
    blob = src.save_state()
    doc = json.loads(blob)
    assert doc["version"] == 1 and len(doc["vcpus"]) == 1
    dst = make(guests, incoming=True, workload="dirty", dirty_rate=0)
    dst.load_state(blob)
    assert dst.save_state() == blob
    with pytest.raises(GuestError, match="not JSON"):
        dst.load_state(b"\xff\x00garbage")
    with pytest.raises(GuestError, match="'version' is 99"):
        dst.load_state(json.dumps({**doc, "version": 99}).encode())
    with pytest.raises(GuestError, match="'smp' is 2"):
        dst.load_state(json.dumps({**doc, "smp": 2}).encode())
    with pytest.raises(GuestError, match="vcpus\\[0\\].rng"):
        dst.load_state(json.dumps({**doc, "vcpus": [{"rng": {"state": 1}}]}).encode())
    with pytest.raises(GuestError, match="JSON object"):
        dst.load_state(b"[1, 2]")


def test_mark_dirty_and_log_errors(guests: list[PortableGuest]) -> None:
    g = make(guests)
    with pytest.raises(GuestError, match="not started"):
        g.sync_dirty_log()
    g.start_dirty_log()
    g.mark_dirty("pc.ram", np.array([7, 3, 7, 2047]))
    assert g.sync_dirty_log()["pc.ram"].tolist() == [3, 7, 2047]
    assert g.sync_dirty_log()["pc.ram"].size == 0
    with pytest.raises(GuestError, match="out of range"):
        g.mark_dirty("pc.ram", np.array([2048]))
    with pytest.raises(GuestError, match="no RAM block named 'vga.ram'"):
        g.mark_dirty("vga.ram", np.array([1]))
    g.stop_dirty_log()
    with pytest.raises(GuestError, match="not started"):
        g.sync_dirty_log()


def test_config_errors() -> None:
    with pytest.raises(GuestError, match="unknown workload 'spin'"):
        create_guest(config(workload="spin"))
    with pytest.raises(GuestError, match="working_set 5000"):
        create_guest(config(workload="dirty", working_set=5000))
    with pytest.raises(GuestError, match="smp 0"):
        create_guest(config(smp=0))
    with pytest.raises(GuestError, match="unknown fill"):
        create_guest(config(fill="nothing"))


def test_close_is_idempotent_and_final() -> None:
    g = create_guest(config(workload="dirty", dirty_rate=0))
    g.start()
    g.close()
    g.close()
    with pytest.raises(GuestError, match="closed"):
        g.resume()
