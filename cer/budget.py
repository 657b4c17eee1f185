"""One budget for the SysV memory (shm pages, queued messages) that the daemon pre-fills into pooled IPC
namespaces, across all pools.

Each filled namespace holds its checkpoint's shm pages and messages in kernel memory, so a pool costs
``capacity x its checkpoint's pre-fill bytes``, and a small image can ask for a lot (pages are cheap to
declare). Each pool reserves what its capacity (an adaptive pool: its ceiling) can hold before it fills;
a reservation that does not fit is refused with :class:`BudgetExceeded`, and the pool says so.
"""

from __future__ import annotations

import os
import threading

from cer.errors import BudgetExceeded

# Without --prefill-budget: a quarter of the machine's memory.
DEFAULT_SHARE = 4


def default_limit() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // DEFAULT_SHARE


_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """A byte count written like ``4G``, ``512M``, ``65536`` or ``1.5G`` (K, M, G, T are powers of 1024;
    a trailing ``iB`` or ``B`` is allowed)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS and raw[-1:] else ""
    number = raw[: len(raw) - len(unit)].strip()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (like 4G, 512M or a number of bytes)") from None
    if not 0 <= value < 1 << 20 or value != value:
        raise ValueError(f"{text!r} is not a size cer accepts")
    return int(value * (1 << _UNITS[unit]))


def describe_bytes(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} bytes"


def reserved_namespaces(capacity: int, max_capacity: int | None) -> int:
    """How many pre-filled IPC namespaces a pool reserves for: its capacity, or an adaptive pool's ceiling."""
    return capacity if max_capacity is None else max_capacity


class PrefillBudget:
    """How many bytes of pre-filled IPC memory the daemon's pools may hold in all, and who holds what.

    Thread-safe: pools reserve from their own actor threads. Reservations are keyed by an owner (a pool
    actor's URN), so a pool started again after a crash never counts twice.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = default_limit() if limit is None else limit
        self._reserved: dict[str, int] = {}
        self._costs: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def reserve(self, owner: str, what: str, per_namespace: int, namespaces: int) -> None:
        """Set ``owner``'s reservation to ``per_namespace x namespaces`` bytes, or raise
        :class:`BudgetExceeded` (keeping its reservation as it was) when the total would pass the limit.
        The cost per namespace is remembered either way, for :meth:`resize`."""
        with self._lock:
            self._costs[owner] = (what, per_namespace)
            self._set(owner, namespaces)

    def resize(self, owner: str, namespaces: int) -> None:
        """Reserve ``namespaces`` at the cost ``owner`` last reserved at, or raise :class:`BudgetExceeded`;
        an owner that never reserved (its checkpoint not read yet) changes nothing: it reserves when it is."""
        with self._lock:
            if owner in self._costs:
                self._set(owner, namespaces)

    def _set(self, owner: str, namespaces: int) -> None:
        what, per_namespace = self._costs[owner]
        wanted = per_namespace * namespaces
        others = sum(self._reserved.values()) - self._reserved.get(owner, 0)
        if wanted and others + wanted > self.limit:
            raise BudgetExceeded(
                f"{what}: {namespaces} IPC namespaces of {describe_bytes(per_namespace)} each "
                f"(shm pages and messages to pre-fill) need {describe_bytes(wanted)}, and the daemon's pre-fill "
                f"budget has {describe_bytes(max(0, self.limit - others))} of {describe_bytes(self.limit)} left "
                "(cer start --prefill-budget); lower the capacity or raise the budget")
        if wanted:
            self._reserved[owner] = wanted
        else:
            self._reserved.pop(owner, None)

    def release(self, owner: str) -> None:
        with self._lock:
            self._reserved.pop(owner, None)
            self._costs.pop(owner, None)
