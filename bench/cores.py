"""Which cores the server and the load generator get, and how much CPU a process used.

Every bench pins the server to its cores and the load generator to others (`--server-cpus`, `--client-cpus`),
so the client never steals the server's CPU; these are the shared parsing and defaults.
"""
from __future__ import annotations

import os
import resource


def parse_cpus(spec: str | None, default: set[int]) -> set[int]:
    """`"1"`, `"2-15"` or `"0,2-3"` as a set of core numbers; `default` when no spec is given."""
    if not spec:
        return default
    out: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def default_split() -> tuple[set[int], set[int]]:
    """(server cores, client cores): the client gets the first core, the servers the rest (both get the one core of
    a one-core machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return set(cpus[1:]), {cpus[0]}


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (the load generator's own cost)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
