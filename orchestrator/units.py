"""Human-readable quantities, shown the same way by every command and log line."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``: binary units, the way ``ls -h`` and ``du -h`` count them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
