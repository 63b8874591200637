"""Plain-text reports of meta-test results: Markdown tables (the horizon study and its seed aggregate)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["markdown_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> list[str]:
    """The lines of a Markdown table: ``header``, the alignment row, one line per row (cells ``str()``'d).

    ``align``: one letter per column, ``l`` (left, ``---``) or ``r`` (right, ``---:``)."""
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l' / 'r' per column ({len(header)}), got {align!r}")
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row {list(r)} has {len(r)} cells, the header {len(header)}")
    sep = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return ["| " + " | ".join(header) + " |", sep, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]
