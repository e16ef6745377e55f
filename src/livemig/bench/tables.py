"""Plain tables of text cells, as ASCII rules or GitHub markdown (the memory and convergence tables)."""

from __future__ import annotations

from collections.abc import Sequence


def grid(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    """A plain table's lines: a header and right-aligned cells, as ASCII rules or markdown."""
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        return out + ["| " + " | ".join(b) + " |" for b in body]
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(len(header))]
    rule = "|" + "|".join("-" * w for w in widths) + "|"
    out = [rule, "|" + "|".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "|", rule]
    for b in body:
        out.append("|" + "|".join(v.rjust(w) for v, w in zip(b, widths, strict=False)) + "|")
    return out + [rule]
