"""livemig's handover protocol: the commit point, its messages and both sides' outcome rules.

Protocol version :data:`VERSION` (5; 2 added the source's ``uuid`` to livemig/config, 3 lets an
:class:`Abort` come before the stream's EOF and has the destination answer :class:`Failed` when
it gives up on its own, 4 adds post-copy: ``postcopy-ram`` in livemig/config, :class:`ReqPages`,
:class:`Pong`, :class:`PostcopyDone` and, for recovery, :class:`ReceivedBitmap` and :class:`ResumeAck`,
and POSTCOPY_RUN as the commit point of a post-copy migration,
docs/postcopy.md; 5 has the destination answer every COMMAND PING with :class:`Pong`, which the
source waits for after each pass). Every handover message carries it; a peer speaking another version is
refused with an error naming both. A change to any message or rule bumps it.

The whole migration, as it crosses the wire::

    source                                                        destination
      | main:   QEVM header, configuration, livemig/config ----------->|  (guest config, parameters)
      |<------------------------------------- return: Ready | Refused  |
      | chans:  MultiFDInit_t, packets on each of N channels ========> |
      | main:   RAM sections per pass, MULTIFD_FLUSH, EOS, PING n ---->|
      |<------------------------------------------------ return: Pong n |  (all before PING processed)
      |   (a cancel or failure before the commit point: Abort ------->|  discard at once)
      |   -- guest paused (source: paused) --                          |
      | main:   END ram, livemig/vcpu, livemig/digest, EOF ----------->|
      |                                      verify RAM digests, load state
      |<---------------------- return: Prepared(digests) | Failed      |  (destination: prepared)
      | check Prepared's digests against its own                        |
      | == COMMIT POINT == (source: committed)                          |
      | control: Commit ---------------------------------------------->|
      |                                                   resume guest  |  (destination: running)
      |<----------------------------------------- return: Resumed     |
      |   (source: completed; its guest stays stopped, QEMU's postmigrate)
      |<----------------------------------------- return: Report      |  (optional, later)

Channels. The *main* channel is one TCP (or unix) connection. Source -> destination it carries
QEMU's main stream up to its ``QEMU_VM_EOF``; after that EOF, the same direction carries the
*control* messages (:class:`Commit`, :class:`Abort`) as JSON lines. An :class:`Abort` may also
come earlier, in place of the stream's next record (a ``{`` where a record type byte or a RAM
record header is due: neither can start with 0x7b, see docs/wire.md, "Return path"); the stream
ends there. The *return path* is the destination -> source direction of the same connection,
JSON lines from the first byte. Putting Commit on the main channel (not a separate socket) keeps
it ordered after the stream it commits: the destination cannot see a Commit for a stream it has
not finished reading.

Rules, for every failure at every step (a lost or delayed message in either direction, a kill of
either side, a cut link, a cancel):

1. At most one copy of the guest ever runs.
2. The destination resumes only after it received the source's :class:`Commit`. A destination that
   loses the source before that (timeout, closed link, :class:`Abort`) discards its guest, and
   unless the source aborted it says why with :class:`Failed` (best effort: the link may be down).
3. The source commits only after a :class:`Prepared` whose digests equal its own; before the
   commit point every failure or cancel resumes the source's guest (the destination cannot run).
4. After the commit the source never resumes on its own. When it cannot know the outcome (the
   answer to Commit was lost, late, or the link broke) its guest stays stopped in QEMU's
   ``postmigrate`` run state, the outcome is ``unknown``, and resuming it is an explicit act of the
   operator after checking the destination.
5. A cancel that arrives after the commit cannot undo it: it is answered as too late.

Wire form: one JSON object per line, UTF-8, at most :data:`MAX_LINE` bytes, with ``"version"``,
``"type"`` and exactly the fields of that type. :func:`encode` and :func:`decode` are the only
codec; unknown versions, types or fields, missing fields and wrong field types raise
:class:`~livemig.errors.WireError` naming them. This module does no I/O.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias

from ..errors import IntegrityError, WireError

if TYPE_CHECKING:
    from ..guest import Guest
    from ..params import MigrationParameters

VERSION = 5
#: the main stream's CONFIGURATION machine type of a livemig source, and its section ids
MACHINE_TYPE = "livemig-1"
SECTION_CONFIG = 1
SECTION_RAM = 2
SECTION_VCPU = 3
SECTION_DIGEST = 4
#: the first section of a post-copy recovery channel: {"uuid": hex} (docs/postcopy.md, "Failure and recovery")
RESUME_SECTION = "livemig/resume"
#: longest handover line accepted, newline included (a Prepared for many RAM blocks fits easily)
MAX_LINE = 1 << 20
#: RAM digest algorithm of :mod:`livemig.ram.digest`
DIGEST_ALGORITHM = "xxh3-128-chunked"

Scalar: TypeAlias = int | float | str | bool | None
Stats: TypeAlias = dict[str, Scalar]
Direction = Literal["to-source", "to-destination"]


# --- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """Return path: the destination accepted livemig/config and created its guest."""

    TYPE: ClassVar[str] = "ready"


@dataclass(frozen=True)
class Refused:
    """Return path: the destination refused the configuration (``error`` says why)."""

    TYPE: ClassVar[str] = "refused"
    error: str


@dataclass(frozen=True)
class Prepared:
    """Return path: the stream is complete, RAM verified, state loaded; the guest waits for Commit.

    ``digests``: RAM block name -> hex digest (``algorithm``) of the destination's RAM;
    ``state``: hex xxh3-128 of the device-state blob as received. The source compares both with its
    own before it commits (:func:`check_prepared`).
    """

    TYPE: ClassVar[str] = "prepared"
    digests: dict[str, str]
    state: str
    algorithm: str = DIGEST_ALGORITHM


@dataclass(frozen=True)
class Resumed:
    """Return path: the destination resumed its guest after Commit; ``stats`` are its counters."""

    TYPE: ClassVar[str] = "resumed"
    stats: Stats = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """Return path: the destination will not run the guest (``error`` says why); it was discarded."""

    TYPE: ClassVar[str] = "failed"
    error: str


@dataclass(frozen=True)
class Report:
    """Return path, optional, after Resumed: what the resumed guest did (progress, workload check)."""

    TYPE: ClassVar[str] = "report"
    stats: Stats = field(default_factory=dict)


@dataclass(frozen=True)
class ReqPages:
    """Return path, post-copy: the destination's guest faulted on missing pages; send ``len`` bytes
    of RAM block ``rbname`` from byte ``start`` ahead of the rest (QEMU's MIG_RP_MSG_REQ_PAGES_ID)."""

    TYPE: ClassVar[str] = "req-pages"
    rbname: str
    start: int
    len: int


@dataclass(frozen=True)
class Pong:
    """Return path: the answer to the main stream's COMMAND PING ``value``: every record before the
    PING was processed, the multifd pages before its flush included (after a pass: the destination
    caught up; post-copy: the early discards are done; QEMU's MIG_RP_MSG_PONG)."""

    TYPE: ClassVar[str] = "pong"
    value: int


@dataclass(frozen=True)
class ReceivedBitmap:
    """Return path, post-copy recovery: the answer to RECV_BITMAP for RAM block ``rbname``:
    ``bitmap`` is hex of one bit per page (numpy ``packbits``, little bit order), set for a page
    the destination has (QEMU's MIG_RP_MSG_RECV_BITMAP)."""

    TYPE: ClassVar[str] = "recv-bitmap"
    rbname: str
    bitmap: str


@dataclass(frozen=True)
class ResumeAck:
    """Return path, post-copy recovery: POSTCOPY_RESUME was read; pages flow again (QEMU's
    MIG_RP_MSG_RESUME_ACK)."""

    TYPE: ClassVar[str] = "resume-ack"


@dataclass(frozen=True)
class PostcopyDone:
    """Return path, post-copy: every page arrived and was placed; ``stats``: the destination's
    figures (``faults``, ``pages-requested``, ``fault-latency-us-p50``/``-p99``, ``verified``)."""

    TYPE: ClassVar[str] = "postcopy-done"
    stats: Stats = field(default_factory=dict)


@dataclass(frozen=True)
class Commit:
    """Control (source -> destination, after the stream's EOF): resume the guest; the source is committed."""

    TYPE: ClassVar[str] = "commit"


@dataclass(frozen=True)
class Abort:
    """Control: the source gave up before committing (``reason``); discard the guest."""

    TYPE: ClassVar[str] = "abort"
    reason: str


ToSource: TypeAlias = (Ready | Refused | Prepared | Resumed | Failed | Report | ReqPages | Pong | ReceivedBitmap
                       | ResumeAck | PostcopyDone)
ToDestination: TypeAlias = Commit | Abort
Message: TypeAlias = ToSource | ToDestination

_BY_DIRECTION: dict[str, dict[str, type[Message]]] = {
    "to-source": {c.TYPE: c for c in (Ready, Refused, Prepared, Resumed, Failed, Report, ReqPages, Pong,
                                      ReceivedBitmap, ResumeAck, PostcopyDone)},
    "to-destination": {c.TYPE: c for c in (Commit, Abort)},
}
_HEX = re.compile(r"[0-9a-f]+")


def _text(what: str, v: object) -> str:
    if not isinstance(v, str):
        raise WireError(what, v, "a string")
    return v


def _hex(what: str, v: object) -> str:
    if not isinstance(v, str) or not _HEX.fullmatch(v):
        raise WireError(what, v, "a lowercase hex digest")
    return v


def _digests(what: str, v: object) -> dict[str, str]:
    if not isinstance(v, dict):
        raise WireError(what, v, "an object of RAM block name -> hex digest")
    return {_text(f"{what} key", k): _hex(f"{what}[{k!r}]", d) for k, d in v.items()}


def _count(what: str, v: object) -> int:
    if type(v) is not int or v < 0:
        raise WireError(what, v, "an integer >= 0")
    return v


def _stats(what: str, v: object) -> Stats:
    if not isinstance(v, dict):
        raise WireError(what, v, "an object of names -> numbers, strings, booleans or null")
    for k, x in v.items():
        if not isinstance(x, int | float | str | bool) and x is not None:
            raise WireError(f"{what}[{k!r}]", x, "a number, string, boolean or null")
    return dict(v)


#: field name -> checker turning a decoded JSON value into the field's value
_CHECKS: dict[str, Callable[[str, object], object]] = {
    "error": _text, "reason": _text, "algorithm": _text, "state": _hex, "digests": _digests, "stats": _stats,
    "rbname": _text, "start": _count, "len": _count, "value": _count, "bitmap": _hex,
}


def encode(msg: Message) -> bytes:
    """One JSON line (``b"...\\n"``) for ``msg``, with the protocol version."""
    body: dict[str, object] = {"version": VERSION, "type": msg.TYPE}
    body.update({f.name: getattr(msg, f.name) for f in fields(msg)})
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes | str, direction: Direction) -> Message:
    """The message in one line (trailing newline optional) travelling in ``direction``.

    Raises WireError naming what is wrong: not JSON or not an object, too long, a missing or other
    ``version``, an unknown ``type`` (or one that does not travel this way), an unknown or missing
    field, or a field of the wrong type.
    """
    if len(line) > MAX_LINE:
        raise WireError(f"handover message of {len(line)} bytes", "too long", f"at most {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise WireError(f"handover message is not JSON: {line[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise WireError("handover message", obj, "a JSON object")
    version = obj.pop("version", None)
    if type(version) is not int or version != VERSION:
        raise WireError("handover protocol version", version, f"{VERSION} (peer runs another livemig?)")
    kinds = _BY_DIRECTION[direction]
    kind = obj.pop("type", None)
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"handover message type ({direction})", kind, " or ".join(sorted(kinds)))
    known = {f.name: f for f in fields(cls)}
    extra = sorted(set(obj) - set(known))
    if extra:
        raise WireError(f"handover message '{kind}': unknown field(s) {', '.join(extra)}",
                        extra, f"only {sorted(known) or 'version and type'}")
    values: dict[str, Any] = {}  # each checked by _CHECKS against the field's type
    for name, f in known.items():
        if name in obj:
            values[name] = _CHECKS[name](f"handover message '{kind}' field '{name}'", obj[name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise WireError(f"handover message '{kind}': missing field '{name}'")
    return cls(**values)


def check_prepared(msg: Prepared, ram: Mapping[str, str], state: str) -> None:
    """Compare a destination's Prepared with the source's own digests before committing.

    ``ram``: block name -> hex digest on the source; ``state``: hex xxh3-128 of the state blob sent.
    Raises IntegrityError naming the first block (or the state, or the algorithm) that differs.
    """
    if msg.algorithm != DIGEST_ALGORITHM:
        raise IntegrityError(f"destination digests use '{msg.algorithm}', the source '{DIGEST_ALGORITHM}'")
    for name in sorted(set(ram) | set(msg.digests)):
        mine, theirs = ram.get(name), msg.digests.get(name)
        if mine != theirs:
            raise IntegrityError(f"RAM block '{name}' differs after the handover: source {mine}, "
                                 f"destination {theirs}; not committing")
    if msg.state != state:
        raise IntegrityError(f"guest state differs after the handover: source {state}, destination "
                             f"{msg.state}; not committing")


# --- outcome rules -------------------------------------------------------------------------------
# actions a transition asks of its side (the caller performs them, in order)
PAUSE_GUEST = "pause-guest"
RESUME_GUEST = "resume-guest"
DISCARD_GUEST = "discard-guest"
SEND_COMMIT = "send-commit"
SEND_ABORT = "send-abort"
SEND_PREPARED = "send-prepared"
SEND_RESUMED = "send-resumed"
SEND_FAILED = "send-failed"
ANSWER_TOO_LATE = "answer-too-late"
REPORT_UNKNOWN = "report-unknown"

#: what a cancel after the commit is answered
TOO_LATE = "cancel too late: the handover is committed; the source guest stays stopped"
#: what the operator is told when the outcome is unknown
UNKNOWN_ADVICE = ("outcome unknown: the source committed but did not hear the destination resume; the "
                  "source guest stays paused (postmigrate). Check the destination: if its guest is not "
                  "running, resume the source guest explicitly")

#: what the operator is told when post-copy fails after POSTCOPY_RUN (docs/postcopy.md, "Failure")
POSTCOPY_LOST = ("post-copy failed after the switch: neither side holds the whole guest; the source "
                 "guest stays stopped (postmigrate) and the destination's guest waits for pages that "
                 "cannot come")


@dataclass(frozen=True)
class Transition:
    """Where an event leads: the next ``state`` and the ``actions`` its side must perform, in order."""

    state: str
    actions: tuple[str, ...] = ()


class Rules:
    """One side's outcome rules: a table ``(state, event) -> Transition`` and one step function.

    ``runs``: the states in which this side's guest is running; ``guest``: state -> QEMU run state
    name reported for the guest (``livemig.source-guest`` on the source, ``resumed`` on the destination).
    ``waiting``: the states that still wait for the peer (they have a ``timeout`` transition); a side
    in any other state has settled, and only reads late messages its table names.
    """

    def __init__(self, side: str, start: str, table: Mapping[tuple[str, str], Transition],
                 runs: frozenset[str], guest: Mapping[str, str]) -> None:
        self.side = side
        self.start = start
        self.table = dict(table)
        self.runs = runs
        self.guest = dict(guest)
        self.states = frozenset(s for s, _ in self.table) | frozenset(t.state for t in self.table.values())
        self.events = frozenset(e for _, e in self.table)
        self.waiting = frozenset(s for s, e in self.table if e == "timeout")

    def step(self, state: str, event: str) -> Transition:
        """The transition for ``event`` in ``state``; WireError naming both if the table has none."""
        try:
            return self.table[(state, event)]
        except KeyError:
            raise WireError(f"handover ({self.side}): event '{event}' is not allowed in state '{state}'") from None


def _t(state: str, *actions: str) -> Transition:
    return Transition(state, actions)


# source states
S_RUNNING = "running"              # precopy: guest running, RAM streaming
S_PAUSED = "paused"                # switchover: guest stopped, final data sent, waiting for Prepared
S_COMMITTED = "committed"          # Commit sent, waiting for Resumed
S_COMPLETED = "completed"          # destination resumed; source guest stays stopped
S_UNKNOWN = "unknown"              # committed, no answer: stopped until the operator acts
S_FAILED = "failed"                # failed before the commit: guest resumed
S_CANCELLED = "cancelled"          # cancelled before the commit: guest resumed
S_OPERATOR_RESUMED = "operator-resumed"  # the operator resumed the guest of an unknown outcome
# source events: switchover, prepared (digests match), mismatch (they do not), refused (Refused or
# Failed received), resumed, timeout, link-lost, error (local failure), cancel, cont (operator)
_LOST = ("timeout", "link-lost", "error")

SOURCE = Rules(
    "source", S_RUNNING,
    {
        (S_RUNNING, "switchover"): _t(S_PAUSED, PAUSE_GUEST),
        **{(S_RUNNING, e): _t(S_FAILED, SEND_ABORT) for e in (*_LOST, "refused")},
        (S_RUNNING, "cancel"): _t(S_CANCELLED, SEND_ABORT),
        (S_PAUSED, "prepared"): _t(S_COMMITTED, SEND_COMMIT),
        # post-copy: POSTCOPY_RUN went out, the destination runs the guest (no Prepared: its RAM is
        # not complete yet); from here on the source guest never resumes
        (S_PAUSED, "postcopy-run"): _t(S_COMMITTED),
        **{(S_PAUSED, e): _t(S_FAILED, SEND_ABORT, RESUME_GUEST) for e in (*_LOST, "mismatch", "refused")},
        (S_PAUSED, "cancel"): _t(S_CANCELLED, SEND_ABORT, RESUME_GUEST),
        (S_COMMITTED, "resumed"): _t(S_COMPLETED),
        **{(S_COMMITTED, e): _t(S_UNKNOWN, REPORT_UNKNOWN) for e in (*_LOST, "refused")},
        (S_COMMITTED, "cancel"): _t(S_COMMITTED, ANSWER_TOO_LATE),
        (S_COMPLETED, "cancel"): _t(S_COMPLETED, ANSWER_TOO_LATE),
        (S_UNKNOWN, "cancel"): _t(S_UNKNOWN, ANSWER_TOO_LATE),
        (S_UNKNOWN, "resumed"): _t(S_COMPLETED),  # a late answer settles it
        (S_UNKNOWN, "cont"): _t(S_OPERATOR_RESUMED, RESUME_GUEST),
        # late answers after the source gave up before committing: a Prepared is aborted (it was
        # never committed), a Failed changes nothing
        **{(s, "prepared"): _t(s, SEND_ABORT) for s in (S_FAILED, S_CANCELLED)},
        **{(s, "refused"): _t(s) for s in (S_FAILED, S_CANCELLED)},
        (S_UNKNOWN, "refused"): _t(S_UNKNOWN),  # the destination will not run it; the operator decides
    },
    runs=frozenset({S_RUNNING, S_FAILED, S_CANCELLED, S_OPERATOR_RESUMED}),
    guest={S_RUNNING: "running", S_PAUSED: "paused", S_COMMITTED: "postmigrate", S_COMPLETED: "postmigrate",
           S_UNKNOWN: "postmigrate", S_FAILED: "running", S_CANCELLED: "running", S_OPERATOR_RESUMED: "running"},
)

# destination states
D_RECEIVING = "receiving"          # stream in progress; guest not loaded
D_PREPARED = "prepared"            # Prepared sent; guest loaded, stopped, waiting for Commit
D_RUNNING = "running"              # Commit received, guest resumed
D_DISCARDED = "discarded"          # gave up before a Commit: the guest never ran
# destination events: verified (stream complete, digests and state good), invalid (bad stream or
# digest), commit, abort, timeout, link-lost, error (local failure)
DESTINATION = Rules(
    "destination", D_RECEIVING,
    {
        # giving up on its own, the destination tells the source why (Failed, best effort: the
        # return path may be down too); after an Abort the source knows, so nothing is sent
        (D_RECEIVING, "verified"): _t(D_PREPARED, SEND_PREPARED),
        # post-copy: POSTCOPY_RUN is the commit (the source never resumes after writing it)
        (D_RECEIVING, "postcopy-run"): _t(D_RUNNING, RESUME_GUEST, SEND_RESUMED),
        **{(D_RECEIVING, e): _t(D_DISCARDED, SEND_FAILED, DISCARD_GUEST) for e in (*_LOST, "invalid")},
        **{(s, "abort"): _t(D_DISCARDED, DISCARD_GUEST) for s in (D_RECEIVING, D_PREPARED)},
        (D_PREPARED, "commit"): _t(D_RUNNING, RESUME_GUEST, SEND_RESUMED),
        **{(D_PREPARED, e): _t(D_DISCARDED, SEND_FAILED, DISCARD_GUEST) for e in _LOST},
        # committed: nothing the source says can stop the guest now
        (D_RUNNING, "abort"): _t(D_RUNNING, ANSWER_TOO_LATE),
        # late control messages after giving up: a Commit is answered Failed, so that the source
        # does not believe the guest runs here
        (D_DISCARDED, "commit"): _t(D_DISCARDED, SEND_FAILED),
        (D_DISCARDED, "abort"): _t(D_DISCARDED),
    },
    runs=frozenset({D_RUNNING}),
    guest={D_RECEIVING: "inmigrate", D_PREPARED: "inmigrate", D_RUNNING: "running", D_DISCARDED: "none"},
)


class Handover:
    """Thread-safe holder of one side's handover state; :meth:`step` applies :class:`Rules`.

    >>> h = Handover(SOURCE); h.step("switchover")
    ('pause-guest',)
    """

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self._state = rules.start
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return self._state

    @property
    def guest(self) -> str:
        """QEMU run state of this side's guest in the current state (``running``, ``postmigrate``, ...)."""
        return self.rules.guest[self._state]

    def step(self, event: str) -> tuple[str, ...]:
        """Apply ``event``; returns the actions to perform. WireError if not allowed (state unchanged)."""
        with self._lock:
            t = self.rules.step(self._state, event)
            self._state = t.state
            return t.actions


def livemig_config(guest: Guest, params: MigrationParameters, uuid: bytes, method: str | None = None,
                   postcopy: bool = False) -> dict[str, Any]:
    """The livemig/config section's JSON object: the guest's description and the parameters both
    sides must share (docs/wire.md, "Main stream"); ``method`` is the one really sent (what
    ``multifd-compression auto`` picked), by default the parameter's; ``postcopy``: the
    capability ``postcopy-ram``."""
    return {
        "protocol": VERSION,
        "uuid": uuid.hex(),  # the destination admits only a main channel with its uuid
        "guest": json.loads(guest.config.to_json()),
        "page-size": guest.page_size,
        "multifd-channels": params.multifd_channels,
        "multifd-compression": method or params.multifd_compression,
        "zero-page-detection": params.zero_page_detection,
        "postcopy-ram": postcopy,
        "blocks": [[b.name, b.size] for b in guest.blocks],
    }
