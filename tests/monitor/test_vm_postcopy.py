"""Post-copy from the monitor: the ``postcopy-ram`` capability, ``migrate-start-postcopy``,
``migrate-recover``, ``migrate resume=true`` and their HMP forms, refused in QEMU's words when there
is nothing to act on; ``info migrate``'s post-copy lines in QEMU's layout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemig.monitor.hmp import format_info_migrate
from monitor.test_vm import Monitor

NOT_ENABLED = "Enable postcopy with migrate_set_capability before the start of migration"
NOT_STARTED = "Postcopy must be started after migration has been started"
NO_PAUSED = "Cannot resume if there is no paused migration"
NOT_PAUSED = "Migrate recover can only be run when postcopy is paused."


@pytest.fixture
def src() -> Iterator[Monitor]:
    m = Monitor()
    yield m
    m.vm.close()


@pytest.fixture
def dst() -> Iterator[Monitor]:
    m = Monitor(incoming=True)
    yield m
    m.vm.close()


def test_capability_listed_off_and_settable(src: Monitor) -> None:
    caps = {c["capability"]: c["state"] for c in src("query-migrate-capabilities")}
    assert caps["postcopy-ram"] is False
    assert "postcopy-ram: off\n" in src.hmp.run("info migrate_capabilities").output
    assert src.hmp.run("migrate_set_capability postcopy-ram on").output == ""
    assert {c["capability"]: c["state"] for c in src("query-migrate-capabilities")}["postcopy-ram"] is True


def test_start_postcopy_refusals(src: Monitor) -> None:
    assert src.error("migrate-start-postcopy") == NOT_ENABLED
    assert src.hmp.run("migrate_start_postcopy").output == f"Error: {NOT_ENABLED}\n"
    src("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    assert src.error("migrate-start-postcopy") == NOT_STARTED
    assert src.hmp.run("migrate_start_postcopy").output == f"Error: {NOT_STARTED}\n"
    assert src.error("migrate-start-postcopy", now=True) == "Parameter 'now' is unexpected"


def test_resume_refused_without_paused_migration(src: Monitor) -> None:
    assert src.error("migrate", uri="tcp:127.0.0.1:1", resume=True) == NO_PAUSED
    assert src.hmp.run("migrate -r tcp:127.0.0.1:1").output == f"Error: {NO_PAUSED}\n"
    assert src.hmp.run("migrate -d -r tcp:127.0.0.1:1").output == f"Error: {NO_PAUSED}\n"
    assert src("query-migrate") == {}  # nothing started


def test_recover_refused_unless_paused(src: Monitor, dst: Monitor) -> None:
    for m in (src, dst):
        assert m.error("migrate-recover", uri="tcp:127.0.0.1:0") == NOT_PAUSED
        assert m.hmp.run("migrate_recover tcp:127.0.0.1:0").output == f"Error: {NOT_PAUSED}\n"
    assert dst.error("migrate-recover") == "Parameter 'uri' is missing"
    assert dst.hmp.run("migrate_recover").output.startswith("migrate_recover: missing argument\n")
    dst("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    assert dst("query-migrate")["status"] == "setup"
    assert dst.error("migrate-recover", uri="tcp:127.0.0.1:0") == NOT_PAUSED


def test_help_names_the_postcopy_commands(src: Monitor) -> None:
    out = src.hmp.run("help").output
    assert "migrate [-d] [-r] uri -- migrate to URI (using -d to not wait for completion)\n\t\t\t -r to resume " \
        "a paused postcopy migration\n" in out
    assert "migrate_recover uri -- Continue a paused incoming postcopy migration\n" in out
    assert "migrate_start_postcopy -- Followup to a migration command to switch the migration to postcopy" in out
    names = {c["name"] for c in src("query-commands")}
    assert {"migrate-recover", "migrate-start-postcopy"} <= names


def test_info_migrate_postcopy_lines_in_qemu_order() -> None:
    ram = {"transferred": 8 << 20, "mbps": 1.5, "remaining": 0, "total": 16 << 20, "duplicate": 1, "normal": 2,
           "normal-bytes": 8192, "dirty-sync-count": 3, "page-size": 4096, "multifd-bytes": 4096,
           "pages-per-second": 10, "dirty-pages-rate": 7, "postcopy-requests": 42, "precopy-bytes": 2048,
           "postcopy-bytes": 5 << 20}
    out = format_info_migrate({"status": "postcopy-active", "total-time": 5, "ram": ram})
    lines = out.splitlines()
    assert lines[0] == "Migration status: postcopy-active"
    i = lines.index("dirty pages rate: 7 pages")
    assert lines[i + 1:i + 4] == ["postcopy request count: 42", "precopy ram: 2 kbytes", "postcopy ram: 5120 kbytes"]
    # no request yet: no line, as QEMU
    assert "postcopy request" not in format_info_migrate({"ram": ram | {"postcopy-requests": 0}})


def test_destination_without_userfaultfd_refuses_the_capability(src: Monitor, dst: Monitor,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from livemig.guest import uffd

    monkeypatch.setattr(uffd, "unavailable", lambda: "userfaultfd: Operation not permitted")
    on = [{"capability": "postcopy-ram", "state": True}]
    assert dst.error("migrate-set-capabilities", capabilities=on) == \
        "Postcopy is not supported: userfaultfd: Operation not permitted"
    assert {c["capability"]: c["state"] for c in dst("query-migrate-capabilities")}["postcopy-ram"] is False
    src("migrate-set-capabilities", capabilities=on)  # a source serves no faults: not checked, as QEMU
    assert {c["capability"]: c["state"] for c in src("query-migrate-capabilities")}["postcopy-ram"] is True


def test_max_postcopy_bandwidth_parameter(src: Monitor) -> None:
    assert src("query-migrate-parameters")["max-postcopy-bandwidth"] == 0  # 0: max-bandwidth applies
    assert src.hmp.run("migrate_set_parameter max-postcopy-bandwidth 1000").output == ""  # bytes/s, as QEMU
    assert "max-postcopy-bandwidth: 1000 bytes/second\n" in src.hmp.run("info migrate_parameters").output
    assert src.hmp.run("migrate_set_parameter max-postcopy-bandwidth 2M").output == ""
    assert src("query-migrate-parameters")["max-postcopy-bandwidth"] == 2 << 20
    assert src.error("migrate-set-parameters", **{"max-postcopy-bandwidth": -1}) == \
        "Parameter 'max-postcopy-bandwidth' expects uint64_t"
