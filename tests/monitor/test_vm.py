"""The VM controller and its QMP/HMP commands in one process: run states, refusals in QEMU's words,
parameters and capabilities, and migrations between two VMs (completed, cancelled, paused before
switchover), with the events each side sends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from livemig.guest import GuestConfig, create_guest
from livemig.monitor import CommandTable, QMPError, Session, version_info
from livemig.monitor.hmp import HMP
from livemig.vm import commands
from livemig.vm.machine import VM


class Monitor:
    """A VM with its command table, a negotiated session, an HMP and the events it sent."""

    def __init__(self, incoming: bool = False, paused: bool = False, memory: int = 16 << 20,
                 cfg: GuestConfig | None = None, timeout: float = 10) -> None:
        cfg = cfg or GuestConfig(kind="portable", memory=memory, fill="random", workload="idle")
        self.events: list[tuple[str, Any]] = []
        self.vm = VM(create_guest(cfg, incoming=incoming), name="t", incoming=incoming, paused=paused,
                     emit=lambda n, d=None: self.events.append((n, d)), timeout=timeout)
        self.quit: list[tuple[str, int]] = []
        self.vm.on_quit = lambda reason, code: self.quit.append((reason, code))
        self.table = CommandTable()
        self.hmp = HMP(self.table)
        commands.register(self.table, self.vm, lambda line: self.hmp.run(line).output)
        self.session = Session(self.table, version_info())
        assert self.session.handle({"execute": "qmp_capabilities"}) == {"return": {}}

    def __call__(self, name: str, **arguments: Any) -> Any:
        r = self.session.handle({"execute": name, "arguments": arguments})
        if "error" in r:
            raise QMPError(r["error"]["desc"], r["error"]["class"])
        return r["return"]

    def error(self, name: str, **arguments: Any) -> str:
        r = self.session.handle({"execute": name, "arguments": arguments})
        assert r["error"]["class"] == "GenericError", r
        desc: str = r["error"]["desc"]
        return desc

    def statuses(self) -> list[str]:
        return [d["status"] for n, d in list(self.events) if n == "MIGRATION"]

    def names(self) -> list[str]:
        return [n for n, _ in list(self.events)]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def pair() -> Iterator[tuple[Monitor, Monitor]]:
    src, dst = Monitor(), Monitor(incoming=True)
    yield src, dst
    src.vm.close()
    dst.vm.close()


def _start(src: Monitor, dst: Monitor, **params: Any) -> None:
    for m in (src, dst):
        m("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        if params:
            m("migrate-set-parameters", **params)
    dst("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    port = dst("query-migrate")["socket-address"][0]["port"]
    src("migrate", uri=f"tcp:127.0.0.1:{port}", detach=True)


def test_run_states_and_events() -> None:
    m = Monitor()
    try:
        assert m("query-status") == {"status": "running", "running": True}
        assert m("query-name") == {"name": "t"}
        assert m("query-migrate") == {}
        assert {"name": "migrate"} in m("query-commands")
        m("stop")
        assert m("query-status") == {"status": "paused", "running": False}
        assert not m.vm.guest.running
        m("cont")
        assert m("query-status")["status"] == "running" and m.vm.guest.running
        assert m.names() == ["STOP", "RESUME"]
        m("quit")
        assert m.quit == [("host-qmp-quit", 0)]
    finally:
        m.vm.close()
    p = Monitor(paused=True)
    try:
        assert p("query-status") == {"status": "prelaunch", "running": False}
        assert p.hmp.run("info status").output == "VM status: paused (prelaunch)\n"
        p("cont")
        assert p("query-status")["status"] == "running" and p.vm.guest.running
    finally:
        p.vm.close()


def test_wrong_state_refusals(pair: tuple[Monitor, Monitor]) -> None:
    src, dst = pair
    assert src.error("migrate-incoming", uri="tcp:127.0.0.1:0") == "'-incoming' was not specified on the command line"
    assert dst.error("migrate", uri="tcp:127.0.0.1:1") == "Guest is waiting for an incoming migration"
    assert "expected tcp:HOST:PORT or unix:PATH" in src.error("migrate", uri="rdma:host:1")
    assert src.error("migrate", uri="tcp:127.0.0.1:1", resume=True) == "Cannot resume if there is no paused migration"
    assert src.error("migrate-continue", state="pre-switchover") == "Migration not in expected state: none"
    src("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": False}])
    assert "capability 'multifd' must be on" in src.error("migrate", uri="tcp:127.0.0.1:1")
    # cont while inmigrate: as QEMU, not an error: the guest runs once the migration completes
    dst("stop")
    assert dst.vm.autostart is False
    dst("cont")
    assert dst.vm.autostart is True and dst("query-status")["status"] == "inmigrate"
    dst("migrate-incoming", uri="tcp:127.0.0.1:0")
    assert dst.error("migrate-incoming", uri="tcp:127.0.0.1:0") == "The incoming migration has already been started"
    assert src.names() == dst.names() == []  # no refused command had an effect


def test_parameters_and_capabilities(pair: tuple[Monitor, Monitor]) -> None:
    src, _ = pair
    before = src("query-migrate-parameters")
    assert before["multifd-channels"] == 2 and before["max-bandwidth"] == 128 << 20
    src("migrate-set-parameters", **{"multifd-channels": 8, "multifd-compression": "zstd", "downtime-limit": 100})
    after = src("query-migrate-parameters")
    assert (after["multifd-channels"], after["multifd-compression"], after["downtime-limit"]) == (8, "zstd", 100)
    for args, desc in [
        ({"multifd-channels": 0}, "Parameter 'multifd_channels' expects a value between 1 and 255"),
        ({"multifd-channels": 256}, "Parameter 'multifd-channels' expects uint8_t"),
        ({"multifd-zstd-level": 21}, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
        ({"multifd-compression": "lz4"}, "Parameter 'multifd-compression' does not accept value 'lz4'"),
        ({"max-bandwidth": -1}, "Parameter 'max-bandwidth' expects uint64_t"),
        ({"multifd-channels": "4"}, "Invalid parameter type for 'multifd-channels', expected: integer"),
        ({"block-incremental": True}, "Parameter 'block-incremental' is unexpected"),
    ]:
        assert src.error("migrate-set-parameters", **args).startswith(desc)
    # a refused set changes nothing, not even its valid members
    src.error("migrate-set-parameters", **{"multifd-channels": 3, "multifd-zlib-level": 10})
    assert src("query-migrate-parameters") == after
    src("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True},
                                                  {"capability": "pause-before-switchover", "state": True}])
    caps = {c["capability"]: c["state"] for c in src("query-migrate-capabilities")}
    assert caps == {"multifd": True, "return-path": True, "events": True, "pause-before-switchover": True,
                    "auto-converge": False, "postcopy-ram": False}
    assert src.error("migrate-set-capabilities", capabilities=[{"capability": "postcopy-blocktime", "state": True}]) \
        == "Parameter 'capability' does not accept value 'postcopy-blocktime'"


def test_migration_completes_with_events(pair: tuple[Monitor, Monitor]) -> None:
    src, dst = pair
    _start(src, dst, **{"multifd-channels": 3, "multifd-compression": "zlib", "max-bandwidth": 0})
    wait_for(lambda: "completed" in src.statuses() and "completed" in dst.statuses(), "completion")
    assert dst("query-status")["status"] == "running"  # since the handover, before completed (as QEMU)
    assert src.statuses() == ["setup", "active", "device", "completed"]
    assert dst.statuses() == ["setup", "active", "completed"]
    assert src("query-status") == {"status": "postmigrate", "running": False}
    info = src("query-migrate")
    assert info["status"] == "completed" and info["ram"]["total"] == 16 << 20 and "downtime" in info
    assert info["livemig"]["method"] == "zlib" and info["livemig"]["channels"] == 3
    passes = [d["pass"] for n, d in src.events if n == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and passes
    assert "STOP" in src.names() and "RESUME" in dst.names()
    assert dst("query-migrate")["status"] == "completed"
    out = src.hmp.run("info migrate").output
    assert out.startswith("Migration status: completed\ntotal time: ") and "\ntransferred ram: " in out
    assert src.hmp.run("info status").output == "VM status: paused (postmigrate)\n"
    assert src.error("migrate", uri="tcp:127.0.0.1:1") == \
        "Can't migrate the vm that was paused due to previous migration"


def test_cancel_while_active_refuses_changes_meanwhile(pair: tuple[Monitor, Monitor]) -> None:
    src, dst = pair
    _start(src, dst, **{"max-bandwidth": 1 << 20})  # 16 MiB at 1 MiB/s: active for seconds
    wait_for(lambda: src("query-migrate")["status"] == "active", "active")
    assert src.error("migrate", uri="tcp:127.0.0.1:1") == "There's a migration process in progress"
    assert src.error("migrate-set-capabilities", capabilities=[{"capability": "events", "state": False}]) == \
        "There's a migration process in progress"
    live = src("query-migrate")
    assert live["ram"]["transferred"] < live["ram"]["total"] and "expected-downtime" in live
    src("migrate_cancel")
    wait_for(lambda: src("query-migrate")["status"] == "cancelled", "cancelled")
    assert src.statuses()[-2:] == ["cancelling", "cancelled"]
    assert src("query-status")["status"] == "running" and src.vm.guest.running
    wait_for(lambda: dst("query-migrate")["status"] == "failed", "destination failure")
    assert dst("query-status")["status"] == "inmigrate" and dst.quit == []  # exit-on-error false


@pytest.mark.parametrize("cancel", [False, True])
def test_pause_before_switchover_then_continue_or_cancel(pair: tuple[Monitor, Monitor], cancel: bool) -> None:
    src, dst = pair
    src("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": True}])
    _start(src, dst, **{"max-bandwidth": 0})
    wait_for(lambda: src("query-migrate")["status"] == "pre-switchover", "pre-switchover")
    assert src.error("migrate-continue", state="active") == "Migration not in expected state: pre-switchover"
    if cancel:
        src("migrate_cancel")
        wait_for(lambda: src("query-migrate")["status"] == "cancelled", "cancelled")
        assert src("query-status")["status"] == "running" and src.vm.guest.running
    else:
        assert src.hmp.run("migrate_continue pre-switchover").output == ""
        wait_for(lambda: src("query-migrate")["status"] == "completed", "completed")
        assert src.statuses() == ["setup", "active", "pre-switchover", "device", "completed"]


def test_hmp_commands() -> None:
    m = Monitor()
    try:
        run = m.hmp.run
        assert run("migrate_set_parameter multifd-compression zstd").output == ""
        assert run("migrate_set_parameter multifd-qatzip-level 1").output == ""
        assert run("migrate_set_parameter max-bandwidth 100").output == ""
        assert run("migrate_set_capability events on").output == ""
        params = m("query-migrate-parameters")
        assert params["multifd-compression"] == "zstd" and params["max-bandwidth"] == 100 << 20
        out = run("info migrate_parameters").output
        assert "multifd-compression: zstd\n" in out and f"max-bandwidth: {100 << 20} bytes/second\n" in out
        assert "downtime-limit: 300 ms\n" in out
        assert "events: on\n" in run("info migrate_capabilities").output
        assert run("info migrate").output == ""  # no migration yet: nothing, as QEMU
        assert run("migrate_set_parameter multifd-channels 0").output == \
            "Error: Parameter 'multifd_channels' expects a value between 1 and 255\n"
        assert run("migrate_set_parameter multifd-channels many").output == \
            "Error: Parameter 'multifd-channels' expects a number\n"
        assert run("migrate_set_parameter bogus 1").output == "Error: invalid parameter value: bogus\n"
        assert run("migrate_set_parameter max-bandwidth fast").output == "Error: Invalid size fast\n"
        assert run("migrate_set_capability events maybe").output == "Expected 'on' or 'off'\n"
        assert run("migrate_set_capability nope on").output == "Error: invalid parameter value: nope\n"
        assert run("frobnicate").output == "unknown command: 'frobnicate'\n"
        assert run("info frob").output == "unknown command: 'info frob'\n"
        assert run("migrate_set_parameter x").output.startswith("migrate_set_parameter: missing argument\n")
        assert run("migrate_incoming tcp:127.0.0.1:0").output == \
            "Error: '-incoming' was not specified on the command line\n"
        assert "migrate [-d] [-r] uri -- " in run("help").output
        assert run("help migrate_cancel").output == "migrate_cancel -- cancel the current VM migration\n"
        assert run("stop").output == "" and run("info status").output == "VM status: paused\n"
        assert run("c").output == "" and run("info status").output == "VM status: running\n"
        assert m("human-monitor-command", **{"command-line": "info status"}) == "VM status: running\n"
        assert m("query-migrate-parameters")["multifd-compression"] == "zstd"  # errors changed nothing
    finally:
        m.vm.close()


def test_hmp_migrate_waits_unless_detached(pair: tuple[Monitor, Monitor]) -> None:
    src, dst = pair
    dst("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst("query-migrate")["socket-address"][0]["port"]
    result = src.hmp.run(f"migrate tcp:127.0.0.1:{port}")
    assert result.output == "" and result.wait
    wait_for(lambda: src.hmp.migration_status()[0] == "completed", "completed")
    assert src.hmp.migration_status() == ("completed", "")


def test_stopped_destination_stays_paused_after_migration(pair: tuple[Monitor, Monitor]) -> None:
    src, dst = pair
    dst("stop")  # as QEMU's -S destination: no autostart
    _start(src, dst, **{"max-bandwidth": 0})
    wait_for(lambda: dst("query-migrate")["status"] == "completed", "completed")
    wait_for(lambda: dst("query-status")["status"] == "paused", "paused")
    assert not dst.vm.guest.running and "RESUME" not in dst.names()
    dst("cont")
    assert dst("query-status")["status"] == "running" and dst.vm.guest.running


def test_cont_after_an_unknown_outcome_is_an_explicit_act() -> None:
    """The source committed but never heard the destination resume (handover ``unknown``, guest in
    postmigrate): the first cont says what to check and changes nothing; a second one resumes."""
    from types import SimpleNamespace

    from livemig.migration import protocol
    from livemig.migration.handover import SourceHandover
    from livemig.vm.machine import UNKNOWN_CONT

    m = Monitor()
    m.vm.guest.pause()
    handover = SourceHandover(m.vm.guest, lambda _m: None)
    for event in ("switchover", "prepared", "timeout"):  # paused, committed, then no answer
        handover.h.step(event)
    assert handover.state == protocol.S_UNKNOWN
    m.vm.source = SimpleNamespace(handover=handover)  # type: ignore[assignment]
    m.vm.state, m.vm._unknown = "postmigrate", True
    try:
        assert m.error("cont") == UNKNOWN_CONT
        assert "Check the destination first" in UNKNOWN_CONT
        assert m("query-status") == {"status": "postmigrate", "running": False} and not m.vm.guest.running
        assert "RESUME" not in m.names()
        assert m("cont") == {}
        assert m("query-status") == {"status": "running", "running": True} and m.vm.guest.running
        assert handover.state == protocol.S_OPERATOR_RESUMED and m.names()[-1] == "RESUME"
    finally:
        m.vm.source = None
        m.vm.close()
