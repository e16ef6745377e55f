"""The handover's I/O: typed messages on the main channel and each side's driver of its rules.

:mod:`.protocol` says what may happen (messages, the commit point, a table per side); this module
makes it happen on a socket. :class:`ReturnPath` reads and writes :mod:`.protocol` messages as
JSON lines, each read bounded by an absolute deadline. :class:`SourceHandover` and
:class:`DestinationHandover` hold one :class:`~.protocol.Handover` each, turn what happened (a
message, a timeout, a lost link, a local error, a cancel) into the table's event, and perform the
actions the table returns, in order: pause or resume the guest, send Commit/Abort/Prepared/
Resumed/Failed. No other code pauses, resumes or discards a guest once a migration started.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from ..errors import Cancelled, IntegrityError, MigrationError, TransportError, WireError, os_reason
from ..guest import Guest
from ..transport.sockets import send_buffers
from . import protocol as p

#: how often a wait for the peer looks for a cancel, seconds
POLL = 0.05
#: how long a source that sent Abort waits for the destination to close the main channel (its
#: acknowledgement: it read the Abort and discarded its guest) before it closes the channels
ABORT_ACK = 1.0


class HandoverTimeout(TransportError):
    """The peer did not answer within the deadline (the link may still be up)."""


class PeerFailed(MigrationError):
    """The peer answered Refused or Failed: it will not run the guest."""


class ReturnPath:
    """:mod:`.protocol` messages as JSON lines on ``sock``; ``receives`` is the direction read here.

    ``peer`` names the other side in errors ("destination" / "source"). A read raises
    HandoverTimeout when no whole line came within its deadline (however the bytes dribble in),
    TransportError when the link failed or closed, WireError for a malformed line (see
    :func:`.protocol.decode`), Cancelled when its ``cancelled()`` became true (checked every
    :data:`POLL` s).
    """

    def __init__(self, sock: socket.socket, receives: p.Direction, peer: str) -> None:
        self.sock = sock
        self.receives = receives
        self.peer = peer
        self._buf = bytearray()
        self._send_lock = threading.Lock()  # post-copy: the fault thread and the main thread both send

    def send(self, msg: p.Message) -> None:
        with self._send_lock:
            send_buffers(self.sock, [p.encode(msg)], f"handover message '{msg.TYPE}'")

    def prime(self, data: bytes) -> None:
        """Bytes of the next lines that were already read from the socket (by the stream reader)."""
        self._buf[:0] = data

    @contextmanager
    def _own_timeouts(self) -> Iterator[None]:
        """Set socket timeouts freely inside; the socket's own is restored after."""
        old = self.sock.gettimeout()
        try:
            yield
        finally:
            try:
                self.sock.settimeout(old)
            except OSError:
                pass

    def recv(self, timeout: float, cancelled: Callable[[], bool] | None = None) -> p.Message:
        deadline = time.monotonic() + timeout
        with self._own_timeouts():
            while not self._whole_line():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HandoverTimeout(f"no answer from the {self.peer} within {timeout:g} s")
                if cancelled is not None:
                    if cancelled():
                        raise Cancelled("migration cancelled")
                    left = min(left, POLL)
                self.sock.settimeout(left)
                self._read((TimeoutError,))  # on a timeout the deadline check above raises
        return self._take_line()

    def _whole_line(self) -> bool:
        """A whole line is buffered (WireError once more than a line's worth is, without one)."""
        if b"\n" in self._buf:
            return True
        if len(self._buf) > p.MAX_LINE:
            raise WireError(f"handover message from the {self.peer}", "longer line", f"at most {p.MAX_LINE} bytes")
        return False

    def _read(self, retry: tuple[type[BaseException], ...]) -> None:
        """One read into the buffer; the exceptions ``retry`` only mean "nothing yet"."""
        try:
            chunk = self.sock.recv(65536)
        except retry:
            return
        except OSError as exc:
            raise TransportError(f"link to the {self.peer} failed: {os_reason(exc)}") from exc
        if not chunk:
            raise TransportError(f"the {self.peer} closed the connection")
        self._buf += chunk

    def _take_line(self) -> p.Message:
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return p.decode(line, self.receives)

    def poll(self, timeout: float) -> p.Message | None:
        """The next message if a whole line is buffered or arrives within ``timeout`` seconds, else
        None. Unlike :meth:`recv` it never changes the socket's timeout, so another thread may write
        the socket meanwhile (post-copy: the source's page stream and its return-path reader).
        Raises as :meth:`recv` (TransportError, WireError)."""
        deadline = time.monotonic() + timeout
        while not self._whole_line():
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            left = deadline - time.monotonic()
            if not pending and (left <= 0 or not select.select([self.sock], [], [], left)[0]):
                return None
            self._read((BlockingIOError, ssl.SSLWantReadError))
        return self._take_line()

    def wait_closed(self, timeout: float) -> bool:
        """Drop whatever comes until the peer closes or the link fails (True) or ``timeout`` s pass
        (False)."""
        deadline = time.monotonic() + timeout
        with self._own_timeouts():
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    return False
                except (OSError, ValueError):  # ValueError: a TLS socket closed under us
                    return True
        return False


def _lost(exc: BaseException) -> str:
    """The event for a failure that is not a message: timeout, link-lost or error."""
    if isinstance(exc, HandoverTimeout | TimeoutError):
        return "timeout"
    if isinstance(exc, TransportError):
        return "link-lost"
    return "error"


def _root(exc: BaseException) -> BaseException:
    """The original failure under a MigrationError that only added where it happened."""
    while isinstance(exc, MigrationError) and type(exc) is MigrationError and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def failure_text(local: str, peer: str) -> str:
    """A failed migration's error: the destination's reason ``peer`` first when it sent one (the cause;
    the local error is mostly its symptom, e.g. a broken pipe), the local error after it in
    parentheses unless it says the same; else ``local`` alone."""
    if not peer:
        return local
    if not local or peer in local:
        return f"destination: {peer}"
    return f"destination: {peer} (source: {local})"


class SourceHandover:
    """The source's half: :data:`.protocol.SOURCE` applied to one guest and one return path.

    Thread-safe for :meth:`cancel` (any thread) against the commit (the migration thread): a cancel
    either lands before the commit point and stops the migration, or after it and is answered
    :data:`.protocol.TOO_LATE`. ``log`` hears what the operator must know (too late, unknown).
    """

    def __init__(self, guest: Guest, log: Callable[[str], None]) -> None:
        self.h = p.Handover(p.SOURCE)
        self.guest = guest
        self.log = log
        self.rp: ReturnPath | None = None
        self._lock = threading.Lock()
        #: a cancel arrived before the commit point
        self.cancelled = False
        #: a cancel arrived after it (answered too late)
        self.too_late = False
        #: the main stream ends at a record boundary, so an Abort may follow it (False once a write
        #: failed midway: the destination then learns from the broken link instead)
        self.at_boundary = True
        #: the Abort went out
        self.abort_sent = False
        #: what an unknown outcome tells the operator (post-copy: :data:`.protocol.POSTCOPY_LOST`)
        self.unknown_advice = p.UNKNOWN_ADVICE

    @property
    def state(self) -> str:
        """The handover state (:data:`.protocol.S_RUNNING` ... :data:`.protocol.S_UNKNOWN`)."""
        return self.h.state

    @property
    def guest_state(self) -> str:
        """What the source guest does now: running, paused or postmigrate (QEMU's run states)."""
        return self.h.guest

    @property
    def committed(self) -> bool:
        return self.h.state in (p.S_COMMITTED, p.S_COMPLETED, p.S_UNKNOWN)

    def _do(self, actions: tuple[str, ...], reason: str = "") -> None:
        for action in actions:
            if action == p.PAUSE_GUEST:
                self.guest.pause()
            elif action == p.RESUME_GUEST:
                self.guest.resume()
            elif action == p.SEND_COMMIT:
                assert self.rp is not None
                self.rp.send(p.Commit())
            elif action == p.SEND_ABORT and self.rp is not None and self.at_boundary and not self.abort_sent:
                self.abort_sent = True
                try:  # best effort: a destination that does not hear it discards its guest anyway
                    self.rp.send(p.Abort(reason or "the source gave up"))
                except MigrationError:
                    pass
            elif action == p.ANSWER_TOO_LATE:
                self.too_late = True
                self.log(p.TOO_LATE)
            elif action == p.REPORT_UNKNOWN:
                self.log(self.unknown_advice)

    def cont(self) -> None:
        """The operator resumes the guest of an unknown outcome (``cont`` at ``livemig vm``'s monitor)."""
        with self._lock:
            self._do(self.h.step("cont"))

    def switchover(self) -> None:
        """Stop the guest for the final pass (the table's pause)."""
        self._do(self.h.step("switchover"))

    def postcopy_run(self) -> None:
        """POSTCOPY_RUN was written: the commit point of a post-copy migration (the guest stays
        stopped here whatever happens next). Cancelled if a cancel came before it."""
        with self._lock:
            if self.cancelled:
                raise Cancelled("migration cancelled")
            self._do(self.h.step("postcopy-run"))
            self.unknown_advice = p.POSTCOPY_LOST

    def cancel(self) -> bool:
        """A cancel from any thread: True if it stops the migration (before the commit point), False
        if it came too late (answered, logged; the source guest stays stopped)."""
        with self._lock:
            if self.committed:
                self._do(self.h.step("cancel"))
                return False
            self.cancelled = True
            return True

    def is_cancelled(self) -> bool:
        """A cancel arrived before the commit point (a wait for the destination polls this)."""
        return self.cancelled

    def _answer(self, timeout: float, want: type[p.Message]) -> p.Message:
        assert self.rp is not None
        msg = self.rp.recv(timeout, self.is_cancelled)
        if isinstance(msg, p.Refused | p.Failed):
            raise PeerFailed(f"destination failed: {msg.error.removeprefix('destination: ')}")
        if not isinstance(msg, want):
            raise WireError(f"handover message while waiting for '{want.TYPE}'", msg.TYPE,
                            f"{want.TYPE} or failed")
        return msg

    def commit(self, ram: Mapping[str, str], state: str, timeout: float) -> None:
        """Wait for Prepared, check its digests against ``ram``/``state`` and send Commit.

        Raises (before the commit point: :meth:`fail` then resumes the guest) HandoverTimeout,
        TransportError, WireError, PeerFailed, IntegrityError (digests differ) or Cancelled.
        """
        msg = self._answer(timeout, p.Prepared)
        assert isinstance(msg, p.Prepared)
        p.check_prepared(msg, ram, state)
        with self._lock:
            if self.cancelled:
                raise Cancelled("migration cancelled")
            actions = self.h.step("prepared")
        self._do(actions)

    def await_abort_ack(self) -> bool:
        """After an Abort, give the destination :data:`ABORT_ACK` s to read it and close the main
        channel (True if it did), so that it learns of the abort from the Abort itself, not from
        channels closing under it."""
        return self.abort_sent and self.rp is not None and self.rp.wait_closed(ABORT_ACK)

    def peer_reason(self, exc: BaseException, wait: float = 1.0) -> str:
        """The destination's own account of the failure ``exc``, if it sent one (Failed or Refused)
        on the return path within ``wait`` seconds; "" otherwise (also after a cancel, or when
        ``exc`` already is its answer: PeerFailed). Without its ``destination: `` prefix."""
        if self.rp is None or self.cancelled or isinstance(_root(exc), PeerFailed):
            return ""
        try:
            msg = self.rp.recv(wait)
        except MigrationError:
            return ""
        return msg.error.removeprefix("destination: ") if isinstance(msg, p.Failed | p.Refused) else ""

    def resumed(self, timeout: float) -> p.Resumed:
        """Wait for the destination's Resumed after Commit (raises as :meth:`commit`, except Cancelled)."""
        msg = self._answer(timeout, p.Resumed)
        assert isinstance(msg, p.Resumed)
        self._do(self.h.step("resumed"))
        return msg

    def fail(self, exc: BaseException) -> None:
        """The migration failed with ``exc`` (or was cancelled): apply the table (resume the guest
        before the commit point, keep it stopped after). No-op once settled."""
        if self.h.state not in p.SOURCE.waiting:
            return
        root = _root(exc)
        if self.cancelled or isinstance(root, Cancelled | KeyboardInterrupt):
            event = "cancel"
        elif isinstance(root, PeerFailed):
            event = "refused"
        elif isinstance(root, IntegrityError) and self.h.state == p.S_PAUSED:
            event = "mismatch"
        else:
            event = _lost(root)
        self._do(self.h.step(event), reason=str(exc))


class DestinationHandover:
    """The destination's half: :data:`.protocol.DESTINATION` applied to its guest.

    ``resumed_stats()`` gives the Resumed message's counters at the moment the guest resumed.
    ``rp`` is set once the main channel is known; before that a failure has no one to tell.
    """

    def __init__(self, guest: Callable[[], Guest | None], resumed_stats: Callable[[], p.Stats],
                 log: Callable[[str], None]) -> None:
        self.h = p.Handover(p.DESTINATION)
        self.guest = guest
        self.resumed_stats = resumed_stats
        self.log = log
        self.rp: ReturnPath | None = None
        self._prepared: p.Prepared | None = None
        #: the guest's progress() just before it resumed
        self.progress_at_resume = 0
        #: False in post-copy: the thread resuming the guest places its pages, so it must not read
        #: guest RAM (a missing page would wait for itself; docs/postcopy.md, "Guests and the GIL")
        self.read_progress = True
        #: False: on commit the guest is taken over but not run (``livemig vm -S``, QEMU's paused
        #: destination), until the VM's ``cont``
        self.resume_guest = True
        #: called once the guest is taken over (resumed, or kept stopped by ``resume_guest``), before
        #: the source hears Resumed: ``livemig vm`` switches its run state there
        self.on_resumed: Callable[[], None] | None = None

    @property
    def running(self) -> bool:
        return self.h.state in p.DESTINATION.runs

    def _do(self, actions: tuple[str, ...], reason: str = "") -> None:
        for action in actions:
            guest = self.guest()
            if action == p.SEND_PREPARED:
                assert self.rp is not None and self._prepared is not None
                self.rp.send(self._prepared)
            elif action == p.RESUME_GUEST:
                assert guest is not None
                if self.read_progress:
                    self.progress_at_resume = guest.progress()
                if self.resume_guest:
                    guest.resume()
                if self.on_resumed is not None:
                    self.on_resumed()
            elif action == p.SEND_RESUMED:
                assert self.rp is not None
                try:  # the guest runs here now, whatever happens to this answer
                    self.rp.send(p.Resumed(self.resumed_stats()))
                except MigrationError as exc:
                    self.log(f"guest resumed, but the source did not get the answer: {exc}")
            elif action in (p.SEND_FAILED, p.ANSWER_TOO_LATE) and self.rp is not None:
                try:
                    self.rp.send(p.Failed(reason if action == p.SEND_FAILED else "abort after commit: too late"))
                except MigrationError:
                    pass
            elif action == p.DISCARD_GUEST:
                self.log(f"guest discarded, never run: {reason}")

    def prepared(self, digests: dict[str, str], state: str) -> None:
        """The stream is complete and verified: answer Prepared and wait for the commit."""
        self._prepared = p.Prepared(digests, state)
        self._do(self.h.step("verified"))

    def postcopy_run(self) -> None:
        """POSTCOPY_RUN arrived: resume the guest now (its missing pages fault) and answer Resumed."""
        self._do(self.h.step("postcopy-run"))

    def control(self, data: bytes, timeout: float) -> None:
        """A control line where the stream's next record was due (``data``: the bytes from its
        ``{`` on; see :class:`~livemig.wire.events.ControlLine`). Only an Abort may come there: it
        discards the guest and raises MigrationError; anything else raises WireError."""
        assert self.rp is not None
        self.rp.prime(data)
        self.await_commit(timeout)

    def await_commit(self, timeout: float) -> None:
        """Wait for Commit (resume, answer Resumed) or Abort (discard); raises on anything else."""
        assert self.rp is not None
        msg = self.rp.recv(timeout)
        if isinstance(msg, p.Abort):
            self._do(self.h.step("abort"), reason=f"the source aborted: {msg.reason}")
            raise MigrationError(f"the source aborted the migration: {msg.reason}")
        self._do(self.h.step("commit"))

    def fail(self, exc: BaseException) -> None:
        """The migration failed before a commit: apply the table (tell the source when it helps,
        discard the guest). No-op once settled (running or discarded)."""
        if self.h.state not in p.DESTINATION.waiting:
            return
        root = _root(exc)
        invalid = isinstance(root, WireError | IntegrityError) and self.h.state == p.D_RECEIVING
        self._do(self.h.step("invalid" if invalid else _lost(root)), reason=str(exc))
