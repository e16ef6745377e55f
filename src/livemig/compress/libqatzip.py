"""ctypes binding of Intel QATzip (``libqatzip.so.3``, API 2.5 as in QATzip 1.3.1).

Only what livemig needs: :func:`load` finds and loads the library, :func:`probe` says whether a QAT
device answers, and :class:`QzSession` is one deflate session (one per channel thread: QATzip
sessions must not be shared between threads) with strict length checks.

Facts (docs/qatzip.md, "API"): structure layouts for x86_64, ``qzInit(sess, 1)`` returns
QZ_OK without hardware and the session's ``hw_session_stat`` then reads QZ_NO_HW (11), after which
QATzip compresses with zlib in software. QATzip returns QZ_OK for truncated or too-large output, and
a session that saw bad input stays poisoned: so every call is checked for ``rc == QZ_OK``, all input
consumed and the exact output size, and any failure tears the session down and sets it up again.

Library search order: ``$LIVEMIG_QATZIP_LIB`` (a path to libqatzip.so.3), the project's
``vendor/qatzip`` tree (installed by ``scripts/fetch-qatzip``), then the system loader. Dependencies
in the vendor tree (libusdm.so.0, libqat.so.4) are loaded first with RTLD_GLOBAL so the dynamic
loader resolves them without LD_LIBRARY_PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import MethodUnavailable

# --- constants (include/qatzip.h, v1.3.1) ---
QZ_OK = 0
QZ_DUPLICATE = 1
QZ_NO_HW = 11
QZ_DEFLATE = 8
QZ_DEFLATE_4B = 0
QZ_DEFLATE_GZIP = 1
QZ_DEFLATE_GZIP_EXT = 2
QZ_DEFLATE_RAW = 3
QZ_DIR_COMPRESS = 0
QZ_DIR_DECOMPRESS = 1
QZ_DIR_BOTH = 2
LOG_NONE = 0

RETURN_CODES: dict[int, str] = {
    0: "QZ_OK", 1: "QZ_DUPLICATE", 2: "QZ_FORCE_SW", -1: "QZ_PARAMS", -2: "QZ_FAIL",
    -3: "QZ_BUF_ERROR", -4: "QZ_DATA_ERROR", -5: "QZ_TIMEOUT", -100: "QZ_INTEG", 11: "QZ_NO_HW",
    12: "QZ_NO_MDRV", 13: "QZ_NO_INST_ATTACH", 14: "QZ_LOW_MEM", 15: "QZ_LOW_DEST_MEM",
    16: "QZ_UNSUPPORTED_FMT", 100: "QZ_NONE", -101: "QZ_NOSW_NO_HW", -102: "QZ_NOSW_NO_MDRV",
    -103: "QZ_NOSW_NO_INST_ATTACH", -104: "QZ_NOSW_LOW_MEM", -105: "QZ_NO_SW_AVAIL",
    -116: "QZ_NOSW_UNSUPPORTED_FMT", -117: "QZ_POST_PROCESS_ERROR", -118: "QZ_METADATA_OVERFLOW",
    -119: "QZ_OUT_OF_RANGE", -200: "QZ_NOT_SUPPORTED",
}  # fmt: skip

INSTALL_HINT = (
    "install QATzip (Debian/Ubuntu: apt-get install libqatzip3), or run scripts/fetch-qatzip "
    "for a project-local copy"
)


def rc_name(rc: int) -> str:
    """``QZ_DATA_ERROR (-4)`` for -4."""
    return f"{RETURN_CODES.get(rc, 'unknown')} ({rc})"


class QzSession_T(ctypes.Structure):  # noqa: N801 (C name)
    _fields_ = [
        ("hw_session_stat", ctypes.c_long),
        ("thd_sess_stat", ctypes.c_int),
        ("internal", ctypes.c_void_p),
        ("total_in", ctypes.c_ulong),
        ("total_out", ctypes.c_ulong),
    ]


class QzSessionParamsCommon_T(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("direction", ctypes.c_int),
        ("comp_lvl", ctypes.c_uint),
        ("comp_algorithm", ctypes.c_ubyte),
        ("max_forks", ctypes.c_uint),
        ("sw_backup", ctypes.c_ubyte),
        ("hw_buff_sz", ctypes.c_uint),
        ("strm_buff_sz", ctypes.c_uint),
        ("input_sz_thrshold", ctypes.c_uint),
        ("req_cnt_thrshold", ctypes.c_uint),
        ("wait_cnt_thrshold", ctypes.c_uint),
        ("polling_mode", ctypes.c_int),
        ("is_sensitive_mode", ctypes.c_uint),
    ]


class QzSessionParamsDeflate_T(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("common_params", QzSessionParamsCommon_T),
        ("huffman_hdr", ctypes.c_int),
        ("data_fmt", ctypes.c_int),
    ]


assert ctypes.sizeof(QzSession_T) == 40
assert ctypes.sizeof(QzSessionParamsDeflate_T) == 56

_UINT_P = ctypes.POINTER(ctypes.c_uint)


class QatzipError(Exception):
    """A QATzip call failed (carries the function name and return code)."""

    def __init__(self, function: str, rc: int, detail: str = "") -> None:
        text = f"{function} returned {rc_name(rc)}"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.function = function
        self.rc = rc


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_load_error: str | None = None


def vendor_dir() -> Path:
    """``<project>/vendor/qatzip/usr/lib/x86_64-linux-gnu`` (where scripts/fetch-qatzip puts it)."""
    return Path(__file__).resolve().parents[3] / "vendor" / "qatzip" / "usr" / "lib" / "x86_64-linux-gnu"


def _candidates() -> list[str]:
    out: list[str] = []
    env = os.environ.get("LIVEMIG_QATZIP_LIB")
    if env:
        out.append(env)
    vend = vendor_dir() / "libqatzip.so.3"
    if vend.exists():
        out.append(str(vend))
    out.append("libqatzip.so.3")
    found = ctypes.util.find_library("qatzip")
    if found:
        out.append(found)
    return out


def _bind(lib: ctypes.CDLL) -> None:
    sess_p = ctypes.POINTER(QzSession_T)
    lib.qzInit.argtypes = [sess_p, ctypes.c_ubyte]
    lib.qzInit.restype = ctypes.c_int
    lib.qzGetDefaultsDeflate.argtypes = [ctypes.POINTER(QzSessionParamsDeflate_T)]
    lib.qzGetDefaultsDeflate.restype = ctypes.c_int
    lib.qzSetupSessionDeflate.argtypes = [sess_p, ctypes.POINTER(QzSessionParamsDeflate_T)]
    lib.qzSetupSessionDeflate.restype = ctypes.c_int
    lib.qzCompress.argtypes = [sess_p, ctypes.c_void_p, _UINT_P, ctypes.c_void_p, _UINT_P, ctypes.c_uint]
    lib.qzCompress.restype = ctypes.c_int
    lib.qzDecompress.argtypes = [sess_p, ctypes.c_void_p, _UINT_P, ctypes.c_void_p, _UINT_P]
    lib.qzDecompress.restype = ctypes.c_int
    lib.qzTeardownSession.argtypes = [sess_p]
    lib.qzTeardownSession.restype = ctypes.c_int
    lib.qzClose.argtypes = [sess_p]
    lib.qzClose.restype = ctypes.c_int
    lib.qzMaxCompressedLength.argtypes = [ctypes.c_uint, sess_p]
    lib.qzMaxCompressedLength.restype = ctypes.c_uint
    lib.qzSetLogLevel.argtypes = [ctypes.c_int]
    lib.qzSetLogLevel.restype = ctypes.c_int


def load_failures(tried: list[tuple[str, BaseException]]) -> str:
    """Why shared libraries did not load, each name tried said once: ``libqpl.so.1, libqpl.so: cannot
    open shared object file: No such file or directory``.

    ``tried`` is (name or path given to ``ctypes.CDLL``, the OSError or AttributeError it raised).
    dlerror's text already starts with the name it was given; that prefix is dropped, and names
    that failed for the same reason are listed together.
    """
    by_reason: dict[str, list[str]] = {}
    for cand, exc in tried:
        reason = str(exc).removeprefix(f"{cand}: ")
        by_reason.setdefault(reason, []).append(cand)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())


def load() -> ctypes.CDLL:
    """The loaded library (cached), or MethodUnavailable saying what was tried and what to install."""
    global _lib, _lib_path, _load_error
    with _lock:
        if _lib is not None:
            return _lib
        if _load_error is not None:
            raise MethodUnavailable(_load_error)
        errors: list[tuple[str, BaseException]] = []
        for cand in _candidates():
            try:
                if os.sep in cand:
                    # vendor copies: load dependencies from the same folder first
                    folder = Path(cand).parent
                    for dep in ("libusdm.so.0", "libqat.so.4"):
                        if (folder / dep).exists():
                            ctypes.CDLL(str(folder / dep), mode=ctypes.RTLD_GLOBAL)
                lib = ctypes.CDLL(cand)
                _bind(lib)
            except (OSError, AttributeError) as exc:
                errors.append((cand, exc))
                continue
            lib.qzSetLogLevel(LOG_NONE)
            _lib, _lib_path = lib, cand
            return lib
        _load_error = f"libqatzip.so.3 could not be loaded (tried {load_failures(errors)}); {INSTALL_HINT}"
        raise MethodUnavailable(_load_error)


def library_path() -> str | None:
    """The path or name the library was loaded from, or None if it is not loaded."""
    return _lib_path


def library_label() -> str:
    """Short form of :func:`library_path` for messages: ``libqatzip.so.3 (project vendor/qatzip)``."""
    if _lib_path is None:
        return "libqatzip.so.3 (not loaded)"
    if Path(_lib_path).parent == vendor_dir():
        return "libqatzip.so.3 (project vendor/qatzip)"
    return _lib_path


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` found: whether the library loads and whether a QAT device serves it."""

    loaded: bool
    hardware: bool
    detail: str


_probe: Probe | None = None


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence fd 2 while libqat probes for devices (it prints ``Cannot open /dev/vfio`` without one).

    Process-wide, so it only acts on the main thread (before channel threads exist)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def probe() -> Probe:
    """Load the library and set up one throwaway session to see whether QAT hardware serves it.

    Cached for the process. ``hardware`` is True only when the library loads, ``qzInit`` succeeds and
    the session is not in QZ_NO_HW state."""
    global _probe
    if _probe is not None:
        return _probe
    try:
        lib = load()
    except MethodUnavailable as exc:
        _probe = Probe(False, False, str(exc))
        return _probe
    sess = QzSession_T()
    with quiet_stderr():
        rc = lib.qzInit(ctypes.byref(sess), 1)
        if rc not in (QZ_OK, QZ_DUPLICATE):
            _probe = Probe(True, False, f"qzInit returned {rc_name(rc)}")
            return _probe
        params = QzSessionParamsDeflate_T()
        lib.qzGetDefaultsDeflate(ctypes.byref(params))
        rc = lib.qzSetupSessionDeflate(ctypes.byref(sess), ctypes.byref(params))
        stat = int(sess.hw_session_stat)
        lib.qzTeardownSession(ctypes.byref(sess))
    if rc not in (QZ_OK, QZ_DUPLICATE):
        _probe = Probe(True, False, f"qzSetupSessionDeflate returned {rc_name(rc)}")
    elif stat == QZ_NO_HW or stat < 0:
        _probe = Probe(True, False, f"{library_label()} loads but reports no device ({rc_name(stat)})")
    else:
        _probe = Probe(True, True, f"{library_label()} loads and a QAT device serves it (hw_session_stat {stat})")
    return _probe


class QzSession:
    """One QATzip deflate session (GZIP_EXT by default, sw_backup on); use from one thread only.

    ``compress`` returns the whole output for one ``last=1`` call; ``decompress`` returns exactly
    ``expected`` bytes or raises :class:`QatzipError`. After any failure the session is torn down and
    set up again, because QATzip leaves a poisoned inflate state behind."""

    def __init__(self, level: int = 1, data_fmt: int = QZ_DEFLATE_GZIP_EXT, direction: int = QZ_DIR_BOTH) -> None:
        self.lib = load()
        self.level = level
        self.data_fmt = data_fmt
        self.direction = direction
        self._sess = QzSession_T()
        self._out: ctypes.Array[ctypes.c_char] | None = None
        self._setup()

    def _setup(self) -> None:
        self._sess = QzSession_T()
        rc = self.lib.qzInit(ctypes.byref(self._sess), 1)
        if rc not in (QZ_OK, QZ_DUPLICATE):
            raise QatzipError("qzInit", rc)
        params = QzSessionParamsDeflate_T()
        rc = self.lib.qzGetDefaultsDeflate(ctypes.byref(params))
        if rc != QZ_OK:
            raise QatzipError("qzGetDefaultsDeflate", rc)
        params.common_params.comp_lvl = self.level
        params.common_params.direction = self.direction
        params.common_params.sw_backup = 1
        params.data_fmt = self.data_fmt
        rc = self.lib.qzSetupSessionDeflate(ctypes.byref(self._sess), ctypes.byref(params))
        if rc not in (QZ_OK, QZ_DUPLICATE) or not self._sess.internal:
            raise QatzipError("qzSetupSessionDeflate", rc)

    def hardware(self) -> bool:
        """True when this session is served by a QAT device (not the zlib fallback)."""
        stat = int(self._sess.hw_session_stat)
        return stat >= 0 and stat != QZ_NO_HW

    def reset(self) -> None:
        """Tear the session down and set it up again (after any error: QATzip keeps bad state)."""
        self.lib.qzTeardownSession(ctypes.byref(self._sess))
        self._setup()

    def _buffer(self, size: int) -> ctypes.Array[ctypes.c_char]:
        if self._out is None or len(self._out) < size:
            self._out = ctypes.create_string_buffer(size)
        return self._out

    def compress(self, data: bytes) -> bytes:
        """One ``qzCompress(last=1)`` over ``data``; all input must be consumed."""
        n = len(data)
        # qzMaxCompressedLength under-counts members (docs/qatzip.md, "Known defects"): add a gzip
        # header+footer per 64 KiB
        bound = self.lib.qzMaxCompressedLength(n, ctypes.byref(self._sess)) + (n // 65536 + 2) * 64
        out = self._buffer(bound)
        src_len = ctypes.c_uint(n)
        dst_len = ctypes.c_uint(bound)
        rc = self.lib.qzCompress(ctypes.byref(self._sess), data, ctypes.byref(src_len), out, ctypes.byref(dst_len), 1)
        if rc != QZ_OK or src_len.value != n:
            self.reset()
            raise QatzipError("qzCompress", rc, f"consumed {src_len.value} of {n} bytes")
        return ctypes.string_at(out, dst_len.value)

    def decompress(self, data: bytes, expected: int) -> bytes:
        """``qzDecompress`` of the whole of ``data`` into exactly ``expected`` bytes."""
        n = len(data)
        # one spare byte: output filling the buffer beyond ``expected`` shows a lying payload
        out = self._buffer(expected + 1)
        src_len = ctypes.c_uint(n)
        dst_len = ctypes.c_uint(expected + 1)
        rc = self.lib.qzDecompress(ctypes.byref(self._sess), data, ctypes.byref(src_len), out, ctypes.byref(dst_len))
        if rc != QZ_OK or src_len.value != n or dst_len.value != expected:
            self.reset()
            raise QatzipError(
                "qzDecompress", rc, f"consumed {src_len.value} of {n} bytes, produced {dst_len.value} of {expected}"
            )
        return ctypes.string_at(out, expected)

    def close(self) -> None:
        """Tear the session down (idempotent)."""
        if self._sess.internal:
            self.lib.qzTeardownSession(ctypes.byref(self._sess))
            self._sess = QzSession_T()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
