"""vCPU threads: each runs KVM_RUN in a loop, handles the exits, and parks when paused.

Exits
    ``OUT`` to a port with a handler calls it (the guest programs' budget and report ports, see
    :mod:`.protocol`); ``HLT`` sleeps until the guest is paused (0 % CPU: there is no in-kernel
    irqchip, so every HLT reaches userspace); EINTR returns to the loop. Shutdown (triple fault),
    internal errors, failed entries, MMIO (an unmapped address) and any other exit stop the whole
    guest with :attr:`VcpuRunner.failure` saying why, in KVM's terms.

Pause
    ``immediate_exit = 1`` on every vCPU, then SIGUSR1 to its thread (a no-op handler installed
    from the main thread by :func:`install_kick_handler`, so KVM_RUN returns EINTR); each thread
    re-enters KVM_RUN once with ``immediate_exit`` set, which completes a pending I/O exit (RIP
    past the OUT) without running guest code, and parks on a condition variable (docs/kvm.md,
    "Pausing a vCPU"). A vCPU waiting for a missing page of a post-copy destination may only park
    once the page is placed (docs/kvm.md, "Post-copy: vCPU faults").

The ioctls release the GIL (ctypes), so a thread inside KVM_RUN does not stop other threads.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from ...errors import GuestError
from ..throttle import CpuThrottle
from . import binding as b
from .protocol import ReportPort

#: seconds pause() and close() wait for the vCPU threads
PAUSE_TIMEOUT = 10.0


def _noop_handler(signum: int, frame: object) -> None:
    """SIGUSR1 only has to interrupt KVM_RUN; nothing to do here."""


def install_kick_handler() -> None:
    """Make SIGUSR1 interrupt KVM_RUN (a no-op handler, no SA_RESTART). Call from the main thread.

    From another thread this only checks that some handler is installed already (the default
    action would kill the process) and raises GuestError otherwise.
    """
    current = signal.getsignal(signal.SIGUSR1)
    if threading.current_thread() is threading.main_thread():
        if not callable(current):
            signal.signal(signal.SIGUSR1, _noop_handler)
        signal.siginterrupt(signal.SIGUSR1, True)
    elif not callable(current):
        raise GuestError("the first KVM guest must be created from the main thread (it installs the "
                         "SIGUSR1 handler that pauses vCPUs), or call install_kick_handler() there first")


class Vcpu:
    """One vCPU: its fd, its thread and its host-side device state."""

    def __init__(self, index: int, fd: b.VcpuFd) -> None:
        self.index = index
        self.fd = fd
        self.thread: threading.Thread | None = None
        self.parked = True
        #: when the steps of the last budget grant are due (protocol.next_grant), None: no schedule
        self.next_t: float | None = None
        self.port = ReportPort(index)


#: called on ``OUT port`` with the vCPU and the value written
PortHandler = Callable[[Vcpu, int], None]


class VcpuRunner:
    """The threads of ``vcpus``, started parked; ``ports`` maps I/O port numbers to handlers.

    ``throttle``: the guest's :class:`~livemig.guest.throttle.CpuThrottle`; each vCPU takes its
    scheduled sleep between two ``KVM_RUN`` (:meth:`throttle_kick` brings it out of one).
    """

    def __init__(self, vcpus: list[Vcpu], ports: dict[int, PortHandler],
                 throttle: CpuThrottle | None = None) -> None:
        self.vcpus = vcpus
        self.ports = ports
        self.throttle = throttle
        self.cv = threading.Condition()
        self.want_run = False
        self.closing = False
        #: why the guest stopped on its own (shutdown, internal error, ...), else None
        self.failure: str | None = None

    def start_threads(self) -> None:
        for v in self.vcpus:
            v.thread = threading.Thread(target=self._main, args=(v,), name=f"kvm-vcpu{v.index}", daemon=True)
            v.thread.start()

    # --- control (from other threads) ----------------------------------------------------------------
    def pause(self) -> None:
        """Stop every vCPU; returns when all are parked (pending I/O completed). GuestError on failure."""
        with self.cv:
            if self.want_run:
                self.want_run = False
                for v in self.vcpus:
                    v.fd.immediate_exit = True
                self.cv.notify_all()
        if self.throttle is not None:
            self.throttle.interrupt()  # a vCPU sleeping for the throttle stops sleeping
        self.kick()
        with self.cv:
            stopped = self.cv.wait_for(lambda: all(v.parked for v in self.vcpus), timeout=PAUSE_TIMEOUT)
        if not stopped:
            raise GuestError(f"vCPUs did not stop within {PAUSE_TIMEOUT:.0f} s")
        self.raise_failure()

    def resume(self) -> None:
        """Let the parked vCPUs run (no-op if they run)."""
        with self.cv:
            if self.want_run:
                return
            self.cv.wait_for(lambda: all(v.parked for v in self.vcpus), timeout=PAUSE_TIMEOUT)
            for v in self.vcpus:
                v.fd.immediate_exit = False
                v.next_t = None
            self.want_run = True
            self.cv.notify_all()

    def throttle_kick(self) -> None:
        """Bring every running vCPU out of ``KVM_RUN`` to take its throttle sleep (the throttle's tick):
        ``immediate_exit`` and SIGUSR1, as a pause does, but the vCPUs go on after their sleep."""
        with self.cv:
            if not self.want_run or self.closing:
                return
            for v in self.vcpus:
                v.fd.immediate_exit = True
        self.kick()

    def _stopping(self) -> bool:
        return not self.want_run or self.closing

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds`` in a vCPU thread, waking at once when paused or closed."""
        with self.cv:
            self.cv.wait_for(lambda: not self.want_run or self.closing, timeout=seconds)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise GuestError(f"KVM guest stopped: {self.failure}")

    def fail(self, v: Vcpu, why: str) -> None:
        """Stop the whole guest: one vCPU cannot go on."""
        with self.cv:
            if self.failure is None:
                self.failure = why
            self.want_run = False
            for other in self.vcpus:
                other.fd.immediate_exit = True
            self.cv.notify_all()
        self.kick(skip=v)

    def kick(self, skip: Vcpu | None = None) -> None:
        """SIGUSR1 to every live vCPU thread but ``skip``: KVM_RUN returns EINTR."""
        for v in self.vcpus:
            t = v.thread
            if v is not skip and t is not None and t.ident is not None and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    def close(self) -> None:
        """Stop and join the threads (idempotent); the caller closes the fds afterwards."""
        with self.cv:
            self.closing = True
            self.want_run = False
            for v in self.vcpus:
                v.fd.immediate_exit = True
            self.cv.notify_all()
        self.kick()
        for v in self.vcpus:
            if v.thread is not None and v.thread is not threading.current_thread():
                v.thread.join(timeout=PAUSE_TIMEOUT)

    # --- the vCPU threads --------------------------------------------------------------------------
    def _main(self, v: Vcpu) -> None:
        try:
            self._loop(v)
        except BaseException as exc:  # report, never die silently
            self.fail(v, f"vCPU {v.index}: {exc}")
            with self.cv:
                v.parked = True
                self.cv.notify_all()

    def _loop(self, v: Vcpu) -> None:
        fd = v.fd
        cv = self.cv
        while True:
            with cv:
                if not self.want_run or self.closing:
                    v.parked = True
                    cv.notify_all()
                    while not self.want_run and not self.closing:
                        cv.wait()
                    if self.closing:
                        return
                    v.parked = False
            throttle = self.throttle
            if throttle is not None and throttle.pending(v.index):
                held = throttle.hold(v.index, self._stopping)
                if v.next_t is not None:
                    v.next_t += held  # pacing counts vCPU time, not time held
            if fd.immediate_exit:  # left from a throttle kick (a pause clears want_run first)
                with cv:
                    if self.want_run and not self.closing:
                        fd.immediate_exit = False
            exit_ = fd.run()
            self._handle_exit(v, exit_)
            if not self.want_run:
                # finish a pending I/O exit (RIP past the OUT) without running guest code
                fd.immediate_exit = True
                done = fd.run()
                if not isinstance(done, b.Interrupted):
                    self._handle_exit(v, done)

    def _handle_exit(self, v: Vcpu, exit_: b.Exit) -> None:
        if isinstance(exit_, b.IoOut):
            handler = self.ports.get(exit_.port)
            if handler is None:
                self.fail(v, f"vCPU {v.index}: unexpected OUT to port {exit_.port:#x}")
            else:
                handler(v, exit_.value)
        elif isinstance(exit_, b.Interrupted):
            return
        elif isinstance(exit_, b.Hlt):
            with self.cv:  # sleep (0 % CPU) until paused or closed
                while self.want_run and not self.closing:
                    self.cv.wait()
        elif isinstance(exit_, b.Shutdown):
            self.fail(v, f"vCPU {v.index}: guest shut down (KVM_EXIT_SHUTDOWN, triple fault) at rip {self._rip(v)}")
        elif isinstance(exit_, b.InternalError):
            self.fail(v, f"vCPU {v.index}: KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror "
                         f"{exit_.suberror}, data {[hex(d) for d in exit_.data]}) at rip {self._rip(v)}")
        elif isinstance(exit_, b.FailEntry):
            self.fail(v, f"vCPU {v.index}: entry failed (KVM_EXIT_FAIL_ENTRY, reason "
                         f"{exit_.reason:#x}) at rip {self._rip(v)}")
        elif isinstance(exit_, b.Mmio):
            self.fail(v, f"vCPU {v.index}: guest accessed unmapped address {exit_.addr:#x} "
                         f"(KVM_EXIT_MMIO) at rip {self._rip(v)}")
        else:
            self.fail(v, f"vCPU {v.index}: unexpected exit {exit_} at rip {self._rip(v)}")

    @staticmethod
    def _rip(v: Vcpu) -> str:
        try:
            return hex(v.fd.get_regs().rip)
        except GuestError:
            return "?"
