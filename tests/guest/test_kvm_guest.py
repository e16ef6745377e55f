"""KvmGuest: programs, dirty log, pause/resume, state save/load into a second VM, failures."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from livemig.errors import GuestError
from livemig.guest import GuestConfig, create_guest
from livemig.guest.kvm import KvmGuest, unavailable
from livemig.guest.kvm import guest as kg
from livemig.guest.kvm import protocol as pr
from livemig.guest.kvm import state as kst

MEM = 64 << 20


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached within the timeout")
        time.sleep(0.005)


@pytest.fixture
def make() -> Iterator[Callable[..., KvmGuest]]:
    guests: list[KvmGuest] = []

    def factory(incoming: bool = False, **kw: object) -> KvmGuest:
        cfg = GuestConfig(kind="kvm", memory=MEM, **kw)  # type: ignore[arg-type]
        g = create_guest(cfg, incoming=incoming)
        assert isinstance(g, KvmGuest)
        guests.append(g)
        return g

    yield factory
    for g in guests:
        g.close()


# --- no KVM needed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["idle", "dirty", "counter"])
def test_committed_program_bytes_match_sources(name: str, tmp_path: Path) -> None:
    nasm = shutil.which("nasm")
    if nasm is None:
        pytest.skip("nasm not installed (apt-get install nasm): cannot re-assemble the guest programs")
    out = tmp_path / f"{name}.bin"
    subprocess.run([nasm, "-f", "bin", "-o", str(out), str(pr.PROGRAM_DIR / f"{name}.asm")], check=True)
    assert out.read_bytes() == pr.load_program(name)


def test_splitmix_reference_matches_plain_python() -> None:
    mask = 2**64 - 1

    def mix(seed: int, m: int) -> int:
        z = (seed + m * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    steps = np.array([0, 1, 2, 12345, 2**40 + 7], dtype=np.uint64)
    seed = pr.vcpu_seed(5, 1)
    assert [int(x) for x in pr.splitmix_values(seed, steps)] == [mix(seed, int(m)) for m in steps]


def test_unavailable_names_the_cause(tmp_path: Path) -> None:
    reason = unavailable(str(tmp_path / "kvm"))
    assert reason is not None and "no " in reason


@pytest.mark.parametrize(("field", "value", "match"), [
    ("workload", "spin", "workload 'spin'"),
    ("working_set", 10**9, "working_set"),
    ("smp", 0, "smp 0"),
    ("dirty_rate", -1, "dirty_rate"),
    ("memory", 12345, "guest memory"),
])
def test_bad_config_is_refused(field: str, value: object, match: str) -> None:
    cfg = GuestConfig(kind="kvm", memory=MEM)
    setattr(cfg, field, value)
    with pytest.raises(GuestError, match=match):
        KvmGuest(cfg)


# --- with KVM -------------------------------------------------------------------------------------
@pytest.mark.kvm
def test_dirty_guest_logs_exactly_its_working_set(make: Callable[..., KvmGuest]) -> None:
    g = make(workload="dirty", dirty_rate=0, working_set=64)
    lay = g.layout
    g.start_dirty_log()
    assert g.sync_dirty_log()["pc.ram"].size == 0
    g.start()
    _wait(lambda: g.progress() > 64 * 4)  # several passes over the working set
    g.pause()
    pages = g.sync_dirty_log()["pc.ram"]
    assert pages.dtype == np.int64
    expected = [lay.params] + list(range(lay.first_free, lay.first_free + 64))
    assert pages.tolist() == expected
    # paused: nothing new, except what the host marks
    assert g.sync_dirty_log()["pc.ram"].size == 0
    g.mark_dirty("pc.ram", np.array([1000, 7], dtype=np.int64))
    assert g.sync_dirty_log()["pc.ram"].tolist() == [7, 1000]
    with pytest.raises(GuestError, match="0..16383"):
        g.mark_dirty("pc.ram", np.array([1 << 20]))
    g.check_workload()
    g.stop_dirty_log()
    with pytest.raises(GuestError, match="start_dirty_log"):
        g.sync_dirty_log()


@pytest.mark.kvm
def test_dirty_rate_is_paced_and_changes_live(make: Callable[..., KvmGuest]) -> None:
    g = make(workload="dirty", dirty_rate=200)
    g.start()
    time.sleep(0.25)
    g.pause()
    # 200 pages/s for 0.25 s is ~50; one grant at most ahead
    assert 0 < g.progress() <= 200
    g.start_dirty_log()
    g.set_dirty_rate(0)
    before = g.progress()
    assert g.sync_dirty_log()["pc.ram"].tolist() == [g.layout.params]  # the host's own write
    g.resume()
    _wait(lambda: g.progress() > before + 10_000)
    g.pause()
    g.check_workload()


@pytest.mark.kvm
def test_pause_resume_loses_no_progress(make: Callable[..., KvmGuest]) -> None:
    g = make(workload="counter", dirty_rate=100_000, working_set=512, smp=2)
    g.start()
    last = 0
    for _ in range(8):
        _wait(lambda: g.progress() > last + 200)  # noqa: B023
        g.pause()
        assert not g.running
        frozen = g.progress()
        time.sleep(0.01)
        assert g.progress() == frozen  # nothing runs while paused
        g.check_workload()  # reports consecutive, RAM matches the reference
        last = frozen
        g.resume()
    g.pause()
    assert all(seen > 0 for _last, seen in g.reports())
    g.check_workload()


@pytest.mark.kvm
def test_state_moves_to_a_second_vm_and_continues_exactly(make: Callable[..., KvmGuest]) -> None:
    src = make(workload="counter", dirty_rate=100_000, working_set=2048, fill="random", seed=9, smp=2)
    src.start()
    _wait(lambda: src.progress() > 5000)
    src.pause()
    blob = src.save_state()
    src_reports = [last for last, _ in src.reports()]
    at_switch = src.progress()

    # created as `livemig incoming` does, from its own options; the source's config replaces them
    dst = make(incoming=True, smp=2)
    dst.config = GuestConfig.from_json(src.config.to_json())
    assert dst.progress() == 0
    with pytest.raises(GuestError, match="load_state"):
        dst.resume()
    dst.blocks[0].pages[:] = src.blocks[0].pages
    dst.load_state(blob)
    dst.resume()
    _wait(lambda: all(seen >= 3 for _l, seen in dst.reports()))
    dst.pause()
    assert dst.progress() > at_switch
    # the destination's reports started right after the source's last one, with no gap or repeat
    for (last, seen), before in zip(dst.reports(), src_reports, strict=True):
        assert last == before + seen
    dst.check_workload()
    # the source keeps its guest: it can run on as well
    src.resume()
    _wait(lambda: src.progress() > at_switch)
    src.check_workload()


@pytest.mark.kvm
def test_counter_check_detects_corrupted_ram(make: Callable[..., KvmGuest]) -> None:
    g = make(workload="counter", dirty_rate=50_000, working_set=100)
    g.start()
    _wait(lambda: g.progress() > 1000)
    g.pause()
    g.check_workload()
    n = g.progress()
    m = n - 1
    first, count = g.layout.vcpu_pages(1, 0)
    g.blocks[0].pages.view(np.uint64)[first + m % count, (m // count) % 512] ^= np.uint64(1)
    with pytest.raises(GuestError, match=f"step {m} of {n}"):
        g.check_workload()


@pytest.mark.kvm
def test_malformed_state_is_refused(make: Callable[..., KvmGuest]) -> None:
    g = make(workload="idle")
    g.start()
    g.pause()
    blob = g.save_state()
    g.load_state(blob)  # the well-formed one loads
    h = kst.HEADER.size  # every malformation is in test_kvm_state.py; here: a real guest refuses
    with pytest.raises(GuestError, match="CRC-32"):
        g.load_state(blob[:h] + bytes([blob[h] ^ 1]) + blob[h + 1:])
    other = make(workload="idle", smp=2)
    with pytest.raises(GuestError, match="1 vCPUs, this guest has smp 2"):
        other.load_state(blob)
    g.resume()
    with pytest.raises(GuestError, match="paused"):
        g.save_state()


@pytest.mark.kvm
def test_idle_guest_halts_and_migrates(make: Callable[..., KvmGuest]) -> None:
    g = make(workload="idle", smp=2)
    g.start()
    time.sleep(0.05)
    assert g.running
    g.pause()
    assert g.progress() == 0
    blob = g.save_state()
    dst = make(incoming=True, workload="idle", smp=2)
    dst.blocks[0].pages[:] = g.blocks[0].pages
    dst.load_state(blob)
    dst.resume()
    time.sleep(0.05)
    dst.pause()
    assert dst.failure is None
    dst.check_workload()


@pytest.mark.kvm
def test_guest_fault_is_reported(make: Callable[..., KvmGuest]) -> None:
    g = make(workload="counter")
    g.blocks[0].pages[g.layout.code, :2] = [0x0F, 0x0B]  # ud2: no IDT, so a triple fault
    g.start()
    _wait(lambda: g.failure is not None)
    assert "KVM_EXIT_SHUTDOWN" in (g.failure or "")
    with pytest.raises(GuestError, match="shut down"):
        g.pause()
    with pytest.raises(GuestError, match="shut down"):
        g.resume()


@pytest.mark.kvm
def test_missing_capability_and_api_version_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from livemig.guest.kvm import binding, ioctls

    real = binding.Kvm.check_extension

    def without_xcrs(self: binding.Kvm, cap: int) -> int:
        return 0 if cap in (ioctls.KVM_CAP_XCRS, ioctls.KVM_CAP_IMMEDIATE_EXIT) else real(self, cap)

    monkeypatch.setattr(binding.Kvm, "check_extension", without_xcrs)
    with pytest.raises(GuestError, match="missing KVM capabilities: KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_XCRS"):
        kg.open_kvm()
    monkeypatch.setattr(binding.Kvm, "check_extension", real)
    monkeypatch.setattr(binding.Kvm, "api_version", lambda self: 11)
    with pytest.raises(GuestError, match="API version 11, expected 12"):
        kg.open_kvm()


@pytest.mark.kvm
def test_state_kvm_refuses_leaves_a_guest_that_does_not_run(make: Callable[..., KvmGuest]) -> None:
    import zlib

    from livemig.guest.kvm import binding
    from livemig.guest.kvm import structs as st

    src = make(workload="counter")
    blob = src.save_state()
    h = kst.HEADER.size
    body = bytearray(blob[h:])
    off = kst.RECORD.size  # the sregs record comes first
    sregs = st.Sregs.from_buffer_copy(bytes(body[off: off + 312]))
    sregs.cr0 = 0x80000000  # paging without protected mode: KVM_SET_SREGS says EINVAL
    body[off: off + 312] = bytes(sregs)
    magic, version, flags, nvcpus, length, _crc = kst.HEADER.unpack_from(blob)
    bad = kst.HEADER.pack(magic, version, flags, nvcpus, length, zlib.crc32(body)) + bytes(body)
    dst = make(incoming=True, workload="counter")
    with pytest.raises(binding.KvmError) as info:
        dst.load_state(bad)
    assert info.value.ioctl == "KVM_SET_SREGS"
    with pytest.raises(GuestError, match="no complete vCPU state"):
        dst.resume()
    dst.load_state(blob)  # a good blob afterwards makes it runnable
    dst.blocks[0].pages[:] = src.blocks[0].pages
    dst.resume()
    _wait(lambda: dst.progress() > 0)
    dst.pause()
    dst.check_workload()
