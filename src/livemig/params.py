"""Migration parameters, with QEMU's names, defaults, ranges and error wording.

Names are QEMU's QAPI names (``multifd-channels``); :meth:`MigrationParameters.set` takes them as
``migrate_set_parameter`` does. Checks and messages follow QEMU's ``migrate_params_check``
(``Parameter 'multifd_channels' expects a value between 1 and 255``).

Command lines (``livemig migrate``, ``incoming``, ``bench``, ``advise``) check their own options with
:func:`parse_option` (sizes and rates) and :func:`check_option` (numeric ranges), which name the
option and the accepted values, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ParameterError
from .units import RATE_FORMS, SIZE_FORMS, parse_rate, parse_size

#: QEMU's default max-bandwidth (MAX_THROTTLE, 128 MiB/s), livemig's default too.
QEMU_MAX_THROTTLE = 128 << 20


def _expects(name: str, what: str) -> ParameterError:
    return ParameterError(f"Parameter '{name}' expects {what}")


@dataclass
class MigrationParameters:
    """The parameters both ends must agree on, plus the source's policy knobs."""

    multifd_channels: int = 2
    multifd_compression: str = "none"
    multifd_zlib_level: int = 1
    multifd_zstd_level: int = 1
    multifd_qatzip_level: int = 1
    #: bytes per second written to the sockets (after compression); 0 = unlimited; QEMU default 128 MiB/s
    max_bandwidth: int = QEMU_MAX_THROTTLE
    #: bytes per second for post-copy's page stream (QEMU's ``max-postcopy-bandwidth``); 0 = the
    #: ``max-bandwidth`` cap applies, as in precopy (QEMU: 0 = unlimited in post-copy; livemig keeps
    #: the link's cap, docs/postcopy.md, "Rate")
    max_postcopy_bandwidth: int = 0
    #: milliseconds
    downtime_limit: int = 300
    #: "multifd" (9.0+ default: zero pages listed in the multifd packet) or "none" (no detection)
    zero_page_detection: str = "multifd"
    #: stop iterating and switch over anyway after this many dirty-sync passes (0 = never)
    max_passes: int = 0
    # auto-converge (capability ``auto-converge``; docs/wire.md, "Convergence"): QEMU's defaults
    #: percent of vCPU time taken away when throttling starts
    cpu_throttle_initial: int = 20
    #: percent added each time the guest still dirties too fast
    cpu_throttle_increment: int = 10
    #: increase by less than the increment as the throttle nears what is needed (QEMU's tailslow)
    cpu_throttle_tailslow: bool = False
    #: the most percent of vCPU time auto-converge takes away
    max_cpu_throttle: int = 99
    #: throttle when the bytes dirtied in a period exceed this percent of the bytes sent in it
    throttle_trigger_threshold: int = 50

    def check(self) -> None:
        """Raise ParameterError, in QEMU's words, for the first value out of range."""
        from .compress.auto import accepted  # local import: registry imports params-free modules

        if not 1 <= self.multifd_channels <= 255:
            raise _expects("multifd_channels", "a value between 1 and 255")
        if self.multifd_compression not in accepted():  # the methods, and livemig's own "auto"
            raise ParameterError(
                f"Parameter 'multifd-compression' does not accept value '{self.multifd_compression}'"
                f" (known: {', '.join(accepted())})"
            )
        if not 0 <= self.multifd_zlib_level <= 9:
            raise _expects("multifd_zlib_level", "a value between 0 and 9")
        if not 0 <= self.multifd_zstd_level <= 20:
            raise _expects("multifd_zstd_level", "a value between 0 and 20")
        if not 1 <= self.multifd_qatzip_level <= 9:
            raise _expects("multifd_qatzip_level", "a value between 1 and 9")
        if self.max_bandwidth < 0:
            raise _expects("max_bandwidth", "an integer in the range of 0 to 18446744073709551615 bytes/second")
        if not 0 <= self.max_postcopy_bandwidth < 1 << 64:
            raise _expects("max_postcopy_bandwidth",
                           "an integer in the range of 0 to 18446744073709551615 bytes/second")
        if not 0 <= self.downtime_limit <= 2_000_000:
            raise _expects("downtime_limit", "an integer in the range of 0 to 2000000 milliseconds (2000 s)")
        if self.zero_page_detection == "legacy":
            raise ParameterError(
                "Parameter 'zero-page-detection' value 'legacy' (zero pages on the main channel, QEMU <= 8.2)"
                " is not supported by livemig: use 'multifd' (default) or 'none'"
            )
        if self.zero_page_detection not in ("multifd", "none"):
            raise ParameterError(
                f"Parameter 'zero-page-detection' does not accept value '{self.zero_page_detection}'"
            )
        if self.max_passes < 0:
            raise _expects("max_passes", "a value of 0 (never) or more")
        if not 1 <= self.throttle_trigger_threshold <= 100:
            raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
        for name in ("cpu_throttle_initial", "cpu_throttle_increment", "max_cpu_throttle"):
            if not 1 <= getattr(self, name) <= 99:
                raise _expects(name, "an integer in the range of 1 to 99")

    def level(self) -> int:
        """The level of the selected method (0 for methods without one)."""
        return int(getattr(self, f"multifd_{self.multifd_compression}_level", 0))

    def set(self, name: str, value: Any) -> None:
        """``migrate_set_parameter name value``: QAPI name, value as text or number; checked."""
        attr = name.replace("-", "_")
        fields = {f.name: f for f in dataclasses.fields(self)}
        if attr not in fields:
            raise ParameterError(f"Parameter '{name}' not found")
        if attr == "max_postcopy_bandwidth":  # HMP: visit_type_size, a bare number is bytes/s
            v: Any = parse_rate(str(value))
        elif attr == "max_bandwidth":
            # HMP: a bare number is MiB/s, as QEMU's hmp_migrate_set_parameter
            v = parse_rate(f"{value}M" if str(value).isdigit() else str(value))
        elif fields[attr].type in ("bool", bool):
            if str(value).lower() not in ("on", "off", "true", "false"):
                raise ParameterError(f"Parameter '{name}' expects 'on' or 'off'")
            v = str(value).lower() in ("on", "true")
        elif fields[attr].type in ("int", int):
            try:
                v = int(value)
            except (TypeError, ValueError):
                raise ParameterError(f"Parameter '{name}' expects a number") from None
        else:
            v = str(value)
        old = getattr(self, attr)
        setattr(self, attr, v)
        try:
            self.check()
        except ParameterError:
            setattr(self, attr, old)
            raise

    def to_qapi(self) -> dict[str, Any]:
        """``query-migrate-parameters``-shaped dict."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def parse_option(option: str, text: str, kind: Literal["size", "rate"]) -> int:
    """The value of a size option (bytes) or rate option (bytes per second), as :mod:`livemig.units` parses it.

    Raises ParameterError naming ``option`` (``--max-bandwidth``), the text and the accepted forms.
    """
    try:
        return parse_size(text) if kind == "size" else parse_rate(text)
    except ParameterError as exc:
        forms = SIZE_FORMS if kind == "size" else RATE_FORMS
        raise ParameterError(f"{option} '{text}': expected {forms}") from exc


def check_option(option: str, value: float, *, minimum: float = 0, above: bool = False,
                 maximum: float | None = None, what: str = "a number") -> None:
    """Refuse ``value`` of ``option`` outside ``[minimum, maximum]`` (``(minimum, ...`` when ``above``),
    and any infinite or NaN value.

    Raises ParameterError: ``--timeout 0: expected a number of seconds greater than 0``.
    """
    low_ok = value > minimum if above else value >= minimum
    if low_ok and (maximum is None or value <= maximum) and math.isfinite(value):
        return
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    low = f"greater than {minimum:g}" if above else f"{minimum:g} or more"
    bound = low if maximum is None else f"{low} and at most {maximum:g}"
    if not math.isfinite(value):
        what = what.replace("a ", "a finite ", 1) if what.startswith("a ") else f"finite {what}"
    raise ParameterError(f"{option} {shown}: expected {what} {bound}")
