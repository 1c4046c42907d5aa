"""How many threads torch may use: the cores that other processes leave free (issue 12).

A PyTorch intra-op pool waits at the end of every parallel op for its slowest thread. When another
busy process shares the cores, one of our threads is descheduled for a time slice at a time and
every op waits for it: on the project's 2-core machine a `cpu`-preset training step went from 0.84 s
to 2.8 s with 2 threads beside one busy process (one thread on the free core: 1.25 s), and runs
were reported 20-40x slower with a few jobs beside them. Asking the OpenMP runtime to sleep instead
of spin (``OMP_WAIT_POLICY=PASSIVE``) helped under load but cost 20-30% on an idle machine
(docs/LOG.md, 2026-12-01 "the oracle engine in bf16, and a busy CPU").

So ``ThreadGovernor`` watches the machine: every ``interval`` seconds it reads how much CPU the
*other* processes used on the cores this process may run on (``/proc/stat`` over our affinity set,
minus the CPU time of this process and its descendants, so that neither our spinning threads nor
torch.compile's compile workers count against us) and sets torch's intra-op threads to the cores
left free, rounded to the nearest whole core, between 1 and the maximum (torch's default: the
cores, or ``OMP_NUM_THREADS``). Loops call ``poll()`` once per unit of work (a training step, a leaf
of the oracle's tree); between readings it costs one clock read.
``threads=N`` (``--threads N``, config key ``threads``) fixes N threads instead (at most 4 per core) and
turns the governor off. The first time it changes the count it says so on stderr, once. Where
``/proc/stat`` is missing (not Linux) the count stays at the maximum.

The thread count is process-wide state in torch itself, so the governor is one per process.
"""

from __future__ import annotations

import os
import sys
import time

import torch

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def busy_jiffies(cores: list[int]) -> int | None:
    """Jiffies the given cores spent running anything (user, nice, system, irq, softirq) since boot;
    None where ``/proc/stat`` cannot be read. Idle, iowait and steal (the hypervisor's) do not count."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cores}
    total = 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
            total += user + nice + system + irq + softirq
    return total


def _stat_jiffies(stat: str) -> tuple[int, int]:
    """``(ppid, jiffies)`` of a ``/proc/<pid>/stat`` line: the process's user and system time, its
    reaped children's included (after the command's closing parenthesis: state, ppid, ..., fields 14-17)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def own_jiffies() -> int | None:
    """CPU jiffies this process and its living descendants spent (reaped ones included): "ours".

    Our own children are not competitors: torch.compile's compile workers and their compilers are
    child processes, and seeing them as another busy process dropped training to one thread during
    compilation, and every change of the thread count made ``torch.compile`` recompile (it guards on it;
    docs/LOG.md 2026-12-02, 45 s instead of 71 s for the first six steps). None without ``/proc``."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/stat") as f:
            _, total = _stat_jiffies(f.read())
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    children: dict[int, list[tuple[int, int]]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid, jiffies = _stat_jiffies(f.read())
        except (OSError, ValueError):  # gone since the listing
            continue
        children.setdefault(ppid, []).append((pid, jiffies))
    todo = [me]
    while todo:
        for pid, jiffies in children.get(todo.pop(), []):
            total += jiffies
            todo.append(pid)
    return total


def thread_limit() -> int:
    """The most threads a fixed count may ask for: 4 per core (beyond that a pool only waits)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(n) -> None:
    """A thread setting (``threads``, ``--threads``): 0 follows the free cores, N fixes N, at most
    ``thread_limit()`` (a million threads exhausted the system and crashed torch). One-line ValueErrors."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"threads must be 0 (follow the free cores) or a positive integer; got {n!r}")
    if n > thread_limit():
        raise ValueError(f"threads must be at most {thread_limit()} (4 per core of this machine's {os.cpu_count()}); "
                         f"got {n} (0 follows the free cores)")


class ThreadGovernor:
    """See the module docstring. ``fixed``: a thread count to keep (0 or None: follow the free cores)."""

    def __init__(self, fixed: int | None = None, interval: float = 2.0, max_threads: int | None = None):
        if fixed is not None:
            check_threads(fixed)
        self.fixed = fixed or None
        self.interval = interval
        self.cores = _cores()
        self.max_threads = max_threads or torch.get_num_threads()
        self.threads = self.fixed or self.max_threads
        self._last = self._reading()
        self._next = time.monotonic() + interval
        self.changes = 0
        torch.set_num_threads(self.threads)

    def _reading(self) -> tuple[float, int, int] | None:
        busy, ours = busy_jiffies(self.cores), own_jiffies()
        return None if busy is None or ours is None else (time.monotonic(), busy, ours)

    def others(self) -> float | None:
        """Cores the other processes (not ours, not our descendants) used since the last reading (and
        start a new reading)."""
        now = self._reading()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        wall = now[0] - last[0]
        return max(0.0, (now[1] - last[1] - (now[2] - last[2])) / CLK_TCK / wall)

    def decide(self, others: float) -> int:
        """Threads for the free cores: len(cores) - others, to the nearest core, within [1, max]."""
        return max(1, min(self.max_threads, int(len(self.cores) - others + 0.5)))

    def poll(self) -> int:
        """Adjust the thread count if a reading is due; the count in use."""
        if self.fixed is not None or time.monotonic() < self._next:
            return self.threads
        self._next = time.monotonic() + self.interval
        others = self.others()
        if others is not None:
            n = self.decide(others)
            if n != self.threads:
                if self.changes == 0:  # said once: the thread count is no longer what torch or the user set
                    print(f"duollm: other processes are busy on this machine's cores: torch threads {self.threads} -> "
                          f"{n}, following the free cores (--threads N or threads=N fixes them)", file=sys.stderr)
                torch.set_num_threads(n)
                self.threads, self.changes = n, self.changes + 1
        return self.threads


_GOVERNOR: ThreadGovernor | None = None
_EXPLICIT = False  # set from the command line: a config's ``threads`` does not override it


def configure(threads: int | None, *, explicit: bool = False) -> ThreadGovernor:
    """Install the process's governor (``threads``: 0/None follow the free cores, N fixes N). A
    config's value (``explicit=False``) does not replace one given on the command line."""
    global _GOVERNOR, _EXPLICIT
    if _GOVERNOR is not None and _EXPLICIT and not explicit:
        return _GOVERNOR
    max_threads = _GOVERNOR.max_threads if _GOVERNOR is not None else None
    _GOVERNOR = ThreadGovernor(threads, max_threads=max_threads)
    _EXPLICIT = explicit
    return _GOVERNOR


def poll() -> int:
    """The governor's ``poll`` (installed on first use: following the free cores)."""
    return (_GOVERNOR or configure(None)).poll()


def describe() -> str:
    g = _GOVERNOR or configure(None)
    return f"{g.threads} (fixed)" if g.fixed else f"{g.threads} of {g.max_threads} (following the free cores)"
