"""The VM's QMP commands: names, argument types (QEMU's QAPI schema, as far as livemig goes) and
the :class:`~livemig.vm.machine.VM` method each one calls.

Supported: qmp_capabilities, query-version, query-commands, query-status, query-name, stop, cont,
quit, migrate (uri; detach accepted; resume: reconnect a ``postcopy-paused`` migration),
migrate-incoming (uri, exit-on-error), migrate-recover (uri; the destination of a ``postcopy-paused``
migration listens there), migrate-start-postcopy (capability ``postcopy-ram``), migrate_cancel
(refused in post-copy), migrate-continue, migrate-set-capabilities, query-migrate-capabilities,
migrate-set-parameters, query-migrate-parameters, query-migrate, human-monitor-command,
object-add/object-del (tls-creds-x509 and authz-simple; tls-creds-psk is refused when used, as
``--object`` refuses it: Python 3.11's ssl has no TLS-PSK), and livemig's own ``x-query-workload``
(QEMU's ``x-`` prefix for what is not QEMU's: the guest's progress counter and workload check).
Not supported (no livemig counterpart yet): the ``channels`` argument of migrate and
migrate-incoming, capabilities other than those :data:`~livemig.vm.core.CAPABILITIES` lists
(``postcopy-blocktime``, ``postcopy-preempt``...), migrate-pause, ``query-qmp-schema`` (no QAPI introspection;
``query-commands`` lists what exists).
"""

from __future__ import annotations

from collections.abc import Callable

from ..monitor import CommandTable, version_info
from ..monitor.schema import ANY, BOOL, INT, STR, UINT8, UINT64, Enum, ListOf, Member, Struct, Type, struct
from .machine import CAPABILITIES, VM, parameter_fields
from .tlsobjects import TLS_PARAMETERS

#: QEMU's MigrationStatus values livemig reaches (qapi/migration.json)
MIGRATION_STATUSES = ("none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
                      "postcopy-recover", "pre-switchover", "device", "completed", "failed")

#: QEMU's QAPI types of the parameters livemig has (others: by their Python type)
_PARAM_TYPES: dict[str, Type] = {
    "multifd-channels": UINT8, "multifd-zlib-level": UINT8, "multifd-zstd-level": UINT8,
    "multifd-qatzip-level": UINT8, "max-bandwidth": UINT64, "max-postcopy-bandwidth": UINT64, "downtime-limit": UINT64,
    "cpu-throttle-initial": UINT8, "cpu-throttle-increment": UINT8, "max-cpu-throttle": UINT8,
    "throttle-trigger-threshold": UINT8,
}


def parameters_schema() -> Struct:
    """migrate-set-parameters' arguments: every MigrationParameters field, optional, QEMU-named."""
    members = []
    for name, pytype in parameter_fields():
        t = _PARAM_TYPES.get(name) or {int: INT, bool: BOOL}.get(pytype, STR)
        members.append(Member(name, t, optional=True))
    members += [Member(name, STR, optional=True) for name in TLS_PARAMETERS]
    return struct(*members)


def object_schema() -> Struct:
    """object-add's arguments: qom-type, id and the TLS objects' properties (flat or under props)."""
    return struct(Member("qom-type", STR), Member("id", STR), Member("props", ANY, optional=True),
                  Member("dir", STR, optional=True), Member("endpoint", STR, optional=True),
                  Member("verify-peer", BOOL, optional=True), Member("username", STR, optional=True),
                  Member("identity", STR, optional=True))


def register(table: CommandTable, vm: VM, hmp: Callable[[str], str] | None = None) -> None:
    """Add the VM's commands to ``table``; ``hmp`` runs one HMP command line for human-monitor-command."""
    caps = ListOf(struct(Member("capability", Enum(tuple(CAPABILITIES))), Member("state", BOOL)))
    add = table.add
    add("query-version", lambda a: version_info(), help="livemig's version, in QEMU's VersionInfo shape")
    add("query-commands", lambda a: [{"name": n} for n in table.names()], help="the commands above")
    add("query-status", lambda a: vm.query_status(), help="run state: running, paused, inmigrate, ...")
    add("query-name", lambda a: {"name": vm.name} if vm.name else {}, help="the --name given")
    add("stop", lambda a: vm.stop(), help="pause the guest")
    add("cont", lambda a: vm.cont(), help="resume the guest")
    add("quit", lambda a: vm.quit(), help="end the VM process")
    add("x-query-workload", lambda a: vm.query_workload(),
        help="livemig's own: the guest's workload, progress counter and workload check")
    add("migrate", lambda a: vm.migrate(a["uri"], a.get("resume", False)),
        struct(Member("uri", STR), Member("detach", BOOL, optional=True), Member("resume", BOOL, optional=True)),
        help="migrate to tcp:HOST:PORT or unix:PATH (resume: reconnect a postcopy-paused migration)")
    add("migrate-incoming", lambda a: vm.migrate_incoming(a["uri"], a.get("exit-on-error", True)),
        struct(Member("uri", STR), Member("exit-on-error", BOOL, optional=True)),
        help="listen for the incoming migration (after --incoming defer)")
    add("migrate-recover", lambda a: vm.migrate_recover(a["uri"]), struct(Member("uri", STR)),
        help="continue a paused incoming postcopy migration: listen at the URI for the source's resume")
    add("migrate-start-postcopy", lambda a: vm.migrate_start_postcopy(),
        help="switch the running migration to post-copy (capability postcopy-ram on both sides)")
    add("migrate_cancel", lambda a: vm.migrate_cancel(), help="cancel the outgoing migration")
    add("migrate-continue", lambda a: vm.migrate_continue(a["state"]),
        struct(Member("state", Enum(MIGRATION_STATUSES))), help="go on from pre-switchover")
    add("migrate-set-capabilities", lambda a: vm.set_capabilities(a["capabilities"]),
        struct(Member("capabilities", caps)), help="set migration capabilities")
    add("query-migrate-capabilities", lambda a: vm.query_capabilities(), help="migration capabilities")
    add("migrate-set-parameters", vm.set_parameters, parameters_schema(), help="set migration parameters")
    add("query-migrate-parameters", lambda a: vm.query_parameters(), help="migration parameters")
    add("query-migrate", lambda a: vm.query_migrate(), help="migration status and statistics")
    add("object-add", lambda a: vm.tls.add(a), object_schema(), help="add a tls-creds-x509 or authz-simple object")
    add("object-del", lambda a: vm.tls.delete(a["id"]), struct(Member("id", STR)), help="delete an object")
    if hmp is not None:
        add("human-monitor-command", lambda a: hmp(a["command-line"]),
            struct(Member("command-line", STR), Member("cpu-index", INT, optional=True)),
            help="run an HMP command, return its output")
