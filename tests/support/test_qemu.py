"""The QEMU test launcher itself: known bytes land in the RAM file, the blocks are listed, a
destination waits paused."""

from __future__ import annotations

import pytest

from .qemu import DEFAULT_MEMORY, Qemu, known_ram, qemu_or_skip


@pytest.mark.parametrize("kind", ["7.2", "10.0", "qatzip"])
def test_known_ram_and_blocks(kind: str) -> None:
    binary = qemu_or_skip(kind)
    loads = known_ram()
    with Qemu(binary, loads=loads) as vm:
        assert vm.execute("query-status")["status"] == "running"
        blocks = vm.ramblocks()
        assert blocks[0] == {"name": "ram0", "page-size": 4096, "offset": 0,
                             "used": DEFAULT_MEMORY, "total": DEFAULT_MEMORY}
        assert "pc.bios" in {b["name"] for b in blocks}
        ram = vm.read_ram()
        assert len(ram) == DEFAULT_MEMORY
        for load in loads:
            assert ram[load.addr:load.addr + len(load.data)] == load.data, hex(load.addr)
    with Qemu(binary, incoming=True) as dst:
        assert dst.execute("query-status")["status"] == "inmigrate"
