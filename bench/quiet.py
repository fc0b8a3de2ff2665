"""Guard against other work on the machine: measure the CPU that is not ours.

"Other load" = machine busy CPU minus the CPU of this process, its finished children
(wrk, client loops) and the process groups under test (nginx, Granian), in cores. Another
bench running on the same 2 cores would distort the figures; runs whose other load
exceeds the threshold are retried (after waiting for quiet) and flagged in the tables.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import procs


@dataclass
class Meter:
    """Measures other load between :meth:`start` and :meth:`stop`."""

    pgids: Sequence[int]
    _busy: float = field(default=0.0, init=False)
    _own: float = field(default=0.0, init=False)
    _t: float = field(default=0.0, init=False)

    def start(self) -> None:
        """Take the first snapshot."""
        self._busy = procs.machine_busy_seconds()
        self._own = procs.own_cpu_seconds(self.pgids)
        self._t = time.monotonic()

    def stop(self) -> float:
        """Return the other load (cores) since :meth:`start`."""
        busy = procs.machine_busy_seconds() - self._busy
        own = procs.own_cpu_seconds(self.pgids) - self._own
        return max(0.0, (busy - own) / (time.monotonic() - self._t))


@dataclass
class Quiet:
    """Waits (within a total time budget) until the other load is under ``threshold``."""

    threshold: float
    budget_s: float
    waited_s: float = 0.0

    def wait(self, pgids: Sequence[int], max_s: float = 60.0) -> float:
        """Sample 1 s windows until quiet, ``max_s`` passed or the budget ran out."""
        meter = Meter(pgids)
        deadline = time.monotonic() + min(max_s, self.budget_s - self.waited_s)
        while True:
            meter.start()
            time.sleep(1.0)
            load = meter.stop()
            if load <= self.threshold or time.monotonic() >= deadline:
                return load
            self.waited_s += 1.0
