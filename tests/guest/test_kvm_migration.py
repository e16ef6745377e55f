"""A KVM counter guest migrated between two processes over loopback (``livemig migrate --local``):
1 and 8 channels, each method; the destination resumes where the source stopped and continues the
sequence (its reports start right after the source's last one, checked by ``workload_check``), and
RAM is identical at switchover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livemig.guest import GuestConfig
from livemig.guest.kvm.longmode import Layout
from livemig.guest.kvm.protocol import P_N
from support.migrate import killed_destination_leaves_source_running, migrate_local

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

MEM = 64 << 20


CASES = [(method, channels, 1) for method in ("none", "zlib", "zstd") for channels in (1, 8)] + [("zstd", 8, 2)]


@pytest.mark.parametrize(("method", "channels", "smp"), CASES, ids=[f"{m}-{c}ch-smp{s}" for m, c, s in CASES])
def test_kvm_counter_guest_migrates_between_processes(tmp_path: Path, method: str, channels: int,
                                                      smp: int) -> None:
    res, src = migrate_local(tmp_path, MEM, "--guest", "kvm", "--smp", str(smp), "--dirty-rate", "5000",
                             "--multifd-channels", str(channels), "--multifd-compression", method,
                             "--run-before", "0.2")
    assert res["livemig"]["guest"]["kind"] == "kvm"
    assert res["livemig"]["method"] == method and res["livemig"]["channels"] == channels
    # the destination resumed from exactly the counter state the source stopped at
    lay = Layout.of(GuestConfig(kind="kvm", memory=MEM, workload="counter", smp=smp))
    ram64 = src.view(np.uint64).reshape(-1, 512)
    n_at_switchover = int(ram64[lay.params: lay.params + smp, P_N // 8].sum())
    assert res["destination"]["progress_at_resume"] == n_at_switchover


def test_source_keeps_its_kvm_guest_when_the_destination_dies(tmp_path: Path) -> None:
    killed_destination_leaves_source_running(
        tmp_path, GuestConfig(kind="kvm", memory=MEM, workload="counter", dirty_rate=20000, fill="corpus"))
