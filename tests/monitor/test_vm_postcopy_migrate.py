"""A VM pair migrating a busy guest with post-copy over QMP (in one process, the engine's own
threads): ``migrate-start-postcopy`` during precopy, the statuses and events of both sides, the
source's guest kept stopped from the switch on, ``migrate_cancel`` refused in post-copy, the
post-copy figures of ``query-migrate`` and ``info migrate``, and the guest's counter continuing
exactly on the destination."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemig.guest import GuestConfig, uffd
from livemig.monitor import QMPError
from monitor.test_vm import Monitor, wait_for
from support.relay import Relay

pytestmark = pytest.mark.skipif(uffd.unavailable() is not None, reason=f"userfaultfd: {uffd.unavailable()}")


#: a guest counting over a small working set faster than the link carries it
BUSY = GuestConfig(kind="portable", memory=16 << 20, fill="random", workload="counter", dirty_rate=20000,
                   working_set=1024)


@pytest.fixture
def busy_pair() -> Iterator[tuple[Monitor, Monitor]]:
    src, dst = Monitor(cfg=BUSY, timeout=20), Monitor(incoming=True, cfg=BUSY, timeout=20)
    yield src, dst
    src.vm.close()
    dst.vm.close()


def test_postcopy_over_qmp(busy_pair: tuple[Monitor, Monitor]) -> None:
    src, dst = busy_pair
    caps = [{"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": True}]
    for m in (src, dst):
        m("migrate-set-capabilities", capabilities=caps)
    # post-copy at 1 MiB/s: several seconds to look at both sides while it runs
    src("migrate-set-parameters", **{"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 1 << 20,
                                     "multifd-channels": 2})
    dst("migrate-set-parameters", **{"multifd-channels": 2})
    dst("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    port = dst("query-migrate")["socket-address"][0]["port"]
    src("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_for(lambda: "active" in src.statuses(), "precopy")
    src("migrate-start-postcopy")
    src("migrate-start-postcopy")  # twice: no error, as QEMU
    wait_for(lambda: "postcopy-active" in dst.statuses() or "failed" in src.statuses(), "the switch")
    assert src("query-migrate")["status"] == "postcopy-active"
    assert src.error("migrate_cancel") == "Postcopy migration in progress, cannot cancel."
    assert src.error("cont") == "Migration is not finalized yet"  # the source's guest stays stopped
    assert src("query-status") == {"status": "finish-migrate", "running": False}
    assert dst("query-status") == {"status": "running", "running": True}  # runs while its pages arrive
    assert src.hmp.run("info migrate").output.startswith("Migration status: postcopy-active\n")
    assert src.error("migrate-set-capabilities", capabilities=[{"capability": "events", "state": False}]) == \
        "There's a migration process in progress"
    wait_for(lambda: {"completed", "failed"} & set(src.statuses()) and {"completed", "failed"} & set(dst.statuses()),
             "the end", timeout=120)
    info = src("query-migrate")
    assert info["status"] == "completed", info
    assert src.statuses() == ["setup", "active", "device", "postcopy-active", "completed"]
    assert dst.statuses() == ["setup", "active", "postcopy-active", "completed"]
    names = dst.names()
    assert names.index("RESUME") < [i for i, (n, d) in enumerate(dst.events) if n == "MIGRATION"
                                    and d["status"] == "completed"][0]  # the guest ran during post-copy
    assert src("query-status") == {"status": "postmigrate", "running": False}
    assert dst("query-status") == {"status": "running", "running": True}
    assert info["ram"]["postcopy-bytes"] > 0
    pc = info["livemig"]["postcopy"]
    assert pc["time-ms"] >= 0 and pc["pages-requested"] == info["ram"]["postcopy-requests"]
    assert pc["verified"] is True
    out = src.hmp.run("info migrate").output
    assert "\npostcopy ram: " in out
    assert ("postcopy request count: " in out) == bool(info["ram"]["postcopy-requests"])
    work = dst("x-query-workload")
    assert work["check"] == "ok", work
    p0 = work["progress"]
    wait_for(lambda: dst("x-query-workload")["progress"] > p0, "the guest counting on")
    with pytest.raises(QMPError, match="Cannot resume if there is no paused migration"):
        src("migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)


def test_link_cut_in_postcopy_recovered_over_qmp(busy_pair: tuple[Monitor, Monitor]) -> None:
    """A link cut in post-copy pauses both sides (guests as they are); ``migrate-recover`` on the
    destination and ``migrate resume=true`` on the source (HMP ``migrate_recover``, ``migrate -r``)
    bring it back; every page verified, the guest's counter exact."""
    src, dst = busy_pair
    caps = [{"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": True}]
    for m in (src, dst):
        m("migrate-set-capabilities", capabilities=caps)
    src("migrate-set-parameters", **{"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 256 << 10})
    dst("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    port = int(dst("query-migrate")["socket-address"][0]["port"])
    with Relay(("127.0.0.1", port)) as relay:
        src("migrate", uri=relay.uri)
        wait_for(lambda: "active" in src.statuses(), "precopy")
        assert src.error("migrate-recover", uri="tcp:127.0.0.1:0") == \
            "Migrate recover can only be run when postcopy is paused."
        src("migrate-start-postcopy")
        wait_for(lambda: "postcopy-active" in dst.statuses(), "the switch")
        relay.cut()
        wait_for(lambda: "postcopy-paused" in src.statuses() and "postcopy-paused" in dst.statuses(), "the pause")
    assert src("query-migrate")["status"] == dst("query-migrate")["status"] == "postcopy-paused"
    assert src("query-status") == {"status": "finish-migrate", "running": False}  # nothing resumes here
    assert src.error("cont") == "Migration is not finalized yet"
    assert src.error("migrate_cancel") == "Postcopy migration in progress, cannot cancel."
    assert src.error("migrate", uri="tcp:127.0.0.1:1") == "There's a migration process in progress"
    assert dst.hmp.run("migrate_recover tcp:127.0.0.1:0").output == ""
    new_port = dst("query-migrate")["socket-address"][0]["port"]
    assert new_port != str(port)
    out = src.hmp.run(f"migrate -d -r tcp:127.0.0.1:{new_port}").output
    assert out == "", out
    wait_for(lambda: "completed" in src.statuses() and "completed" in dst.statuses(), "the recovered end",
             timeout=120)
    assert src.statuses() == ["setup", "active", "device", "postcopy-active", "postcopy-paused", "postcopy-recover",
                              "postcopy-active", "completed"]
    # the destination's statuses are looked at every 20 ms: its short postcopy-recover may not show
    assert [st for st in dst.statuses() if st != "postcopy-recover"] == \
        ["setup", "active", "postcopy-active", "postcopy-paused", "postcopy-active", "completed"]
    info = src("query-migrate")
    assert info["status"] == "completed" and info["livemig"]["postcopy"]["verified"] is True, info
    assert src("query-status") == {"status": "postmigrate", "running": False}
    work = dst("x-query-workload")
    assert work["check"] == "ok", work
