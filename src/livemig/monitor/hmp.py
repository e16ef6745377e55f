"""HMP, the human monitor: text commands over the same command table as QMP.

Every HMP command calls QMP commands through :meth:`CommandTable.execute`, as QEMU's hmp_* functions
call qmp_*; errors print as ``Error: DESC``. The ``info`` output follows QEMU's
migration/migration-hmp-cmds.c and monitor/hmp-cmds.c layouts (``Migration status: active``,
``transferred ram: 1234 kbytes``, ``multifd-channels: 2``, ``VM status: paused (postmigrate)``).
Parsing errors use monitor/hmp.c's words: ``unknown command: 'x'``, ``Expected 'on' or 'off'``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import MigrationError
from ..units import parse_rate
from .dispatch import CommandTable
from .schema import QMPError

#: what a migration's status is while ``migrate`` without -d keeps the prompt waiting
MIGRATION_RUNNING = ("setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active",
                     "postcopy-recover")


@dataclass
class Result:
    """One command's output; ``wait`` asks an interactive monitor to wait for the migration."""

    output: str = ""
    wait: bool = False


@dataclass(frozen=True)
class _Cmd:
    name: str
    params: str
    help: str
    run: Callable[[HMP, list[str]], Result]
    nargs: tuple[int, int] = (0, 0)


def format_info_migrate(info: dict[str, Any]) -> str:
    """``info migrate`` from a query-migrate answer."""
    lines = []
    if "status" in info:
        status = f"Migration status: {info['status']}"
        if info["status"] == "failed" and info.get("error-desc"):
            status += f" ({info['error-desc']})"
        lines.append(status)
        lines.append(f"total time: {info.get('total-time', 0)} ms")
        for key, label in (("expected-downtime", "expected downtime"), ("downtime", "downtime"),
                           ("setup-time", "setup")):
            if key in info:
                lines.append(f"{label}: {info[key]} ms")
    ram = info.get("ram")
    if ram:
        lines += [
            f"transferred ram: {ram['transferred'] >> 10} kbytes",
            f"throughput: {ram['mbps']:.2f} mbps",
            f"remaining ram: {ram['remaining'] >> 10} kbytes",
            f"total ram: {ram['total'] >> 10} kbytes",
            f"duplicate: {ram['duplicate']} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {ram['page-size'] >> 10} kbytes",
            f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes",
            f"pages-per-second: {ram['pages-per-second']}",
        ]
        if ram.get("dirty-pages-rate"):
            lines.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages")
        if ram.get("postcopy-requests"):
            lines.append(f"postcopy request count: {ram['postcopy-requests']}")
        for key, label in (("precopy-bytes", "precopy ram"), ("downtime-bytes", "downtime ram"),
                           ("postcopy-bytes", "postcopy ram")):
            if ram.get(key):
                lines.append(f"{label}: {ram[key] >> 10} kbytes")
    if "cpu-throttle-percentage" in info:
        lines.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}")
    for addr in info.get("socket-address", []):
        where = addr.get("path") or f"tcp:{addr.get('host')}:{addr.get('port')}"
        lines += ["socket address: [", f"\t{'unix:' if 'path' in addr else ''}{where}", "]"]
    return "".join(f"{line}\n" for line in lines)


_PARAM_UNITS = {"max-bandwidth": " bytes/second", "downtime-limit": " ms", "max-postcopy-bandwidth": " bytes/second"}


def format_info_parameters(params: dict[str, Any]) -> str:
    """``info migrate_parameters``: ``name: value[ unit]`` per parameter."""
    shown = {k: ("on" if v else "off") if isinstance(v, bool) else v for k, v in params.items()}
    return "".join(f"{k}: {v}{_PARAM_UNITS.get(k, '')}\n" for k, v in shown.items())


def format_info_capabilities(caps: list[dict[str, Any]]) -> str:
    return "".join(f"{c['capability']}: {'on' if c['state'] else 'off'}\n" for c in caps)


def format_info_status(status: dict[str, Any]) -> str:
    text = f"VM status: {'running' if status['running'] else 'paused'}"
    if not status["running"] and status["status"] != "paused":
        text += f" ({status['status']})"
    return text + "\n"


class HMP:
    """Runs HMP command lines against ``table`` (a VM's QMP commands)."""

    def __init__(self, table: CommandTable) -> None:
        self.table = table
        self.commands: dict[str, _Cmd] = {}
        self.aliases: dict[str, str] = {"c": "cont", "q": "quit"}
        for cmd in _COMMANDS:
            self.commands[cmd.name] = cmd

    def run(self, line: str) -> Result:
        """Execute one line; the output ends with a newline unless empty. Never raises."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            return Result(f"Error: {exc}\n")
        if not words:
            return Result()
        name = self.aliases.get(words[0], words[0])
        cmd = self.commands.get(name)
        if cmd is None:
            return Result(f"unknown command: '{words[0]}'\n")
        args = words[1:]
        lo, hi = cmd.nargs
        if not lo <= len(args) <= hi:
            problem = "missing argument" if len(args) < lo else "extraneous characters at the end of line"
            return Result(f"{name}: {problem}\nTry \"help {name}\" for more information\n")
        try:
            return cmd.run(self, args)
        except QMPError as exc:
            return Result(f"Error: {exc.desc}\n")

    def qmp(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.table.execute(name, arguments)

    def migration_status(self) -> tuple[str, str]:
        """(status, error-desc) of the current migration, for a monitor waiting on ``migrate``."""
        info = self.qmp("query-migrate")
        return str(info.get("status", "none")), str(info.get("error-desc", ""))


def _help(hmp: HMP, args: list[str]) -> Result:
    cmds = [hmp.commands[args[0]]] if args and args[0] in hmp.commands else list(hmp.commands.values())
    if args and args[0] not in hmp.commands:
        return Result(f"unknown command: '{args[0]}'\n")
    alias = {v: k for k, v in hmp.aliases.items()}
    out = []
    for c in cmds:
        name = f"{c.name}|{alias[c.name]}" if c.name in alias else c.name
        out.append(f"{name} {c.params} -- {c.help}".replace("  ", " "))
    return Result("".join(f"{line}\n" for line in out))


_INFO: dict[str, tuple[str, Callable[[HMP], str]]] = {
    "status": ("show the current VM status (running|paused)", lambda h: format_info_status(h.qmp("query-status"))),
    "migrate": ("show migration status", lambda h: format_info_migrate(h.qmp("query-migrate"))),
    "migrate_parameters": ("show current migration parameters",
                           lambda h: format_info_parameters(h.qmp("query-migrate-parameters"))),
    "migrate_capabilities": ("show current migration capabilities",
                             lambda h: format_info_capabilities(h.qmp("query-migrate-capabilities"))),
    "name": ("show the current VM name", lambda h: f"{h.qmp('query-name').get('name', '')}\n"),
    "version": ("show the version of livemig",
                lambda h: "{qemu[major]}.{qemu[minor]}.{qemu[micro]} {package}\n".format(**h.qmp("query-version"))),
}


def _info(hmp: HMP, args: list[str]) -> Result:
    if not args:
        return Result("".join(f"info {k} -- {v[0]}\n" for k, v in _INFO.items()))
    entry = _INFO.get(args[0])
    if entry is None:
        return Result(f"unknown command: 'info {args[0]}'\n")
    return Result(entry[1](hmp))


def _set_parameter(hmp: HMP, args: list[str]) -> Result:
    name, text = args
    current = hmp.qmp("query-migrate-parameters")
    if name not in current:
        raise QMPError(f"invalid parameter value: {name}")
    value: Any = text
    if name in ("max-bandwidth", "max-postcopy-bandwidth"):
        # a bare number: MiB/s for max-bandwidth (QEMU's qemu_strtosz_MiB), bytes/s for
        # max-postcopy-bandwidth (QEMU's visit_type_size)
        try:
            value = parse_rate(f"{text}M" if text.isdigit() and name == "max-bandwidth" else text)
        except MigrationError as exc:
            raise QMPError(f"Invalid size {text}") from exc
    elif isinstance(current[name], bool):
        if text not in ("on", "off", "true", "false"):
            raise QMPError(f"Parameter '{name}' expects 'on' or 'off'")
        value = text in ("on", "true")
    elif isinstance(current[name], int):
        try:
            value = int(text, 0)
        except ValueError:
            raise QMPError(f"Parameter '{name}' expects a number") from None
    hmp.qmp("migrate-set-parameters", {name: value})
    return Result()


def _set_capability(hmp: HMP, args: list[str]) -> Result:
    name, state = args
    if name not in {c["capability"] for c in hmp.qmp("query-migrate-capabilities")}:
        raise QMPError(f"invalid parameter value: {name}")
    if state not in ("on", "off"):
        return Result("Expected 'on' or 'off'\n")
    hmp.qmp("migrate-set-capabilities", {"capabilities": [{"capability": name, "state": state == "on"}]})
    return Result()


def _migrate(hmp: HMP, args: list[str]) -> Result:
    """``migrate [-d] [-r] uri``: -d returns at once, -r resumes a paused post-copy migration."""
    flags = {a for a in args if a in ("-d", "-r")}
    uris = [a for a in args if a not in ("-d", "-r")]
    if len(uris) != 1:
        return Result("migrate: missing argument\nTry \"help migrate\" for more information\n")
    arguments: dict[str, Any] = {"uri": uris[0]}
    if "-r" in flags:
        arguments["resume"] = True
    hmp.qmp("migrate", arguments)
    return Result(wait="-d" not in flags)


def _qmp(qmp_name: str, *argnames: str) -> Callable[[HMP, list[str]], Result]:
    """An HMP command that is one QMP command, its words as the named arguments."""
    def run(hmp: HMP, args: list[str]) -> Result:
        hmp.qmp(qmp_name, dict(zip(argnames, args, strict=True)))
        return Result()
    return run


_COMMANDS = [
    _Cmd("help", "[cmd]", "show the help", _help, (0, 1)),
    _Cmd("info", "[subcommand]", "show various information about the system state", _info, (0, 1)),
    _Cmd("stop", "", "stop emulation", _qmp("stop")),
    _Cmd("cont", "", "resume emulation", _qmp("cont")),
    _Cmd("quit", "", "quit the emulator", _qmp("quit")),
    _Cmd("migrate", "[-d] [-r] uri", "migrate to URI (using -d to not wait for completion)"
         "\n\t\t\t -r to resume a paused postcopy migration", _migrate, (1, 3)),
    _Cmd("migrate_incoming", "uri", "Continue an incoming migration from an -incoming defer",
         _qmp("migrate-incoming", "uri"), (1, 1)),
    _Cmd("migrate_recover", "uri", "Continue a paused incoming postcopy migration", _qmp("migrate-recover", "uri"),
         (1, 1)),
    _Cmd("migrate_cancel", "", "cancel the current VM migration", _qmp("migrate_cancel")),
    _Cmd("migrate_continue", "state", "Continue migration from the given paused state",
         _qmp("migrate-continue", "state"), (1, 1)),
    _Cmd("migrate_set_capability", "capability state", "Enable/Disable the usage of a capability for migration",
         _set_capability, (2, 2)),
    _Cmd("migrate_set_parameter", "parameter value", "Set the parameter for migration", _set_parameter, (2, 2)),
    _Cmd("migrate_start_postcopy", "", "Followup to a migration command to switch the migration to postcopy mode. "
         "The postcopy-ram capability must be set on both source and destination before the original migration "
         "command .", _qmp("migrate-start-postcopy")),
]
