"""The bench's convergence table: how each row's migration of a busy guest finished, side by side
(plain precopy, auto-converge, post-copy: ``bench --auto-converge --postcopy-ram``). Pure.

Columns: the outcome (``completed``, or ``did not converge in T s`` for a run still in precopy at
the bench's ``--timeout``, or the error), total time and downtime (ms), the vCPU throttle
auto-converge reached (%), the time spent in post-copy (ms), the pages the destination requested,
and its fault latency p50/p99 (µs, fault to page placed). Medians over the repeats; "-" where a row
has no such figure (a precopy row has no post-copy time).
"""

from __future__ import annotations

from collections.abc import Sequence

from .model import Row
from .tables import grid

#: (header, metric, format) of the value columns
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("total time(ms)", "total-time", "{:.0f}"),
    ("downtime(ms)", "downtime", "{:.0f}"),
    ("throttle reached %", "cpu-throttle-peak", "{:.0f}"),
    ("in post-copy(ms)", "postcopy-time", "{:.0f}"),
    ("pages requested", "postcopy-requests", "{:.0f}"),
    ("fault p50(us)", "fault-p50", "{:.0f}"),
    ("fault p99(us)", "fault-p99", "{:.0f}"),
)


#: characters of an error shown in the outcome column (the whole error is listed under the main table)
OUTCOME_WIDTH = 72


def outcome(row: Row) -> str:
    """``completed``, ``did not converge in T s (...)``, or the row's n/a or error note (shortened)."""
    if row.note is None:
        return "completed"
    text = row.note.removeprefix("error: ") if "did not converge" in row.note else row.note
    return text if len(text) <= OUTCOME_WIDTH else text[:OUTCOME_WIDTH - 3] + "..."


def render_convergence(rows: Sequence[Row], markdown: bool = False) -> str:
    """One line per row (livemig rows only: QEMU's are plain precopy), in the rows' order."""
    header = ["row", "outcome", *(c[0] for c in COLUMNS)]
    body = []
    for row in rows:
        if row.peer != "livemig":
            continue
        cells = [row.method, outcome(row)]
        for _title, metric, fmt in COLUMNS:
            v = row.value(metric)
            cells.append("-" if v is None else fmt.format(v))
        body.append(cells)
    return "\n".join(grid(header, body, markdown)) if body else "(no livemig rows)"
