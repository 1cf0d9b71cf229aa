"""Shared measurement helpers for the benchmarks: timelines, quantiles, RSS, tables.

A run is a list of :class:`Record`, one per session, each stamped by the load side
with ``time.perf_counter()`` (the same clock for every system in a run):

* ``seq``: the order in which the session reached the gate (its FIFO place);
* ``t_arrive``: when it reached the gate;
* ``t_admit``: the first instant of its body (NaN if it never ran);
* ``t_release``: the last instant of its body, just before the slot is given back;
* ``t_expired``: when the caller learnt that it expired (NaN unless it did).

From those, :func:`analyse` derives the figures every benchmark prints the same way:

* *utilisation while saturated*: over the time when at least one session was waiting,
  the mean of (sessions running / capacity); also after the first second alone (the
  steady state, without the opening burst that the server is still reading);
* *hand-off gap*: for each release that happened while somebody waited, the time until
  the next admission (releases are matched to admissions oldest first);
* *FIFO inversions*: sessions admitted while an earlier arrival was still waiting, by
  more than ``fifo_guard`` (admission is stamped at the body's first instant, and Trio
  runs the tasks woken in one scheduler batch in any order, so sessions admitted in the
  same batch may stamp out of order without any of them having waited for another);
* *waits past the deadline*: sessions still waiting more than ``tolerance`` after their
  deadline (admitted late, or told late that they expired);
* *expiry lateness*: for expired sessions, when the caller learnt it minus the deadline.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

NAN = math.nan


@dataclass(slots=True)
class Record:
    seq: int = -1
    t_arrive: float = NAN
    t_admit: float = NAN
    t_release: float = NAN
    t_expired: float = NAN

    @property
    def admitted(self) -> bool:
        return not math.isnan(self.t_admit)

    @property
    def expired(self) -> bool:
        return not math.isnan(self.t_expired)

    @property
    def wait_end(self) -> float:
        """When the session stopped waiting (admitted or told it expired); NaN if neither."""
        return self.t_admit if self.admitted else self.t_expired


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile; NaN for no values."""
    if not values:
        return NAN
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    if not values:
        return NAN
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Analysis:
    arrivals: int = 0
    admitted: int = 0
    completed: int = 0
    expired: int = 0
    other: int = 0
    saturated_s: float = 0.0
    utilisation: float = NAN
    #: The same after the first ``steady_after`` seconds (the opening burst excluded).
    utilisation_steady: float = NAN
    handoff_gaps: list[float] = field(default_factory=list)
    idle_releases: int = 0
    fifo_inversions: int = 0
    admitted_past_deadline: int = 0
    waits_past_deadline: int = 0
    expiry_lateness: list[float] = field(default_factory=list)
    max_active: int = 0
    span_s: float = 0.0

    def summary(self) -> dict[str, float]:
        gaps = self.handoff_gaps
        late = self.expiry_lateness
        return {
            "arrivals": self.arrivals,
            "admitted": self.admitted,
            "completed": self.completed,
            "expired": self.expired,
            "other": self.other,
            "saturated_s": self.saturated_s,
            "utilisation": self.utilisation,
            "utilisation_steady": self.utilisation_steady,
            "handoffs": len(gaps),
            "handoff_p50_s": quantile(gaps, 0.5),
            "handoff_p99_s": quantile(gaps, 0.99),
            "handoff_max_s": max(gaps) if gaps else NAN,
            "idle_releases": self.idle_releases,
            "fifo_inversions": self.fifo_inversions,
            "admitted_past_deadline": self.admitted_past_deadline,
            "waits_past_deadline": self.waits_past_deadline,
            "expiry_late_p50_s": quantile(late, 0.5),
            "expiry_late_p99_s": quantile(late, 0.99),
            "expiry_late_max_s": max(late) if late else NAN,
            "max_active": self.max_active,
            "span_s": self.span_s,
        }


# Event kinds, in the order they are applied when two share a timestamp: an admission
# is applied before the same session's end of waiting, so it can take a pending release.
_ADMIT, _WAIT_END, _RELEASE, _ARRIVE = 0, 1, 2, 3


def analyse(
    records: Iterable[Record],
    capacity: int,
    deadline: float,
    tolerance: float = 0.05,
    fifo_guard: float = 0.002,
    steady_after: float = 1.0,
) -> Analysis:
    recs = list(records)
    out = Analysis(arrivals=len(recs))
    events: list[tuple[float, int]] = []
    for r in recs:
        events.append((r.t_arrive, _ARRIVE))
        if r.admitted:
            out.admitted += 1
            events.append((r.t_admit, _ADMIT))
            events.append((r.t_admit, _WAIT_END))
            if not math.isnan(r.t_release):
                out.completed += 1
                events.append((r.t_release, _RELEASE))
            if r.t_admit - r.t_arrive > deadline:
                out.admitted_past_deadline += 1
        elif r.expired:
            out.expired += 1
            events.append((r.t_expired, _WAIT_END))
            out.expiry_lateness.append(r.t_expired - r.t_arrive - deadline)
        else:
            out.other += 1
            continue
        if r.wait_end - r.t_arrive > deadline + tolerance:
            out.waits_past_deadline += 1
    if not events:
        return out
    events.sort()
    out.span_s = events[-1][0] - events[0][0]

    waiting = active = 0
    pending: deque[float] = deque()
    busy = 0.0
    prev = events[0][0]
    steady_from = prev + steady_after
    steady_s = steady_busy = 0.0
    for t, kind in events:
        if waiting > 0:
            dt = t - prev
            out.saturated_s += dt
            share = min(active, capacity) / capacity
            busy += dt * share
            if t > steady_from:
                steady_dt = t - max(prev, steady_from)
                steady_s += steady_dt
                steady_busy += steady_dt * share
        prev = t
        if kind == _ARRIVE:
            waiting += 1
        elif kind == _ADMIT:
            active += 1
            out.max_active = max(out.max_active, active)
            if pending:
                out.handoff_gaps.append(t - pending.popleft())
        elif kind == _WAIT_END:
            waiting -= 1
            if waiting == 0:
                # Nobody left to hand these to: the slots went idle for lack of demand.
                out.idle_releases += len(pending)
                pending.clear()
        else:  # _RELEASE
            active -= 1
            if waiting > 0:
                pending.append(t)
    out.utilisation = busy / out.saturated_s if out.saturated_s > 0 else NAN
    out.utilisation_steady = steady_busy / steady_s if steady_s > 0 else NAN

    # FIFO: walking in arrival order, an admitted session is an inversion if some
    # earlier arrival was still waiting (had neither been admitted nor expired) then.
    latest_wait_end = -math.inf
    for r in sorted(recs, key=lambda r: r.seq):
        if r.admitted and latest_wait_end > r.t_admit + fifo_guard:
            out.fifo_inversions += 1
        end = r.wait_end
        if not math.isnan(end):
            latest_wait_end = max(latest_wait_end, end)
    return out


# -- the run's context ---------------------------------------------------------------


def git_rev(root: str) -> str:
    """The commit measured, and whether src/ had uncommitted edits (others work live)."""
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted src/ edits" if dirty else "")


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- process memory ----------------------------------------------------------------------


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (this process by default), from /proc."""
    path = f"/proc/{pid or 'self'}/statm"
    with open(path) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


# -- printing ------------------------------------------------------------------------------


def fmt_ms(seconds: float, digits: int = 2) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1000:.{digits}f} ms"


def fmt_us(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n: float) -> str:
    if math.isnan(n):
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.2f} %"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (also readable in a terminal)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
