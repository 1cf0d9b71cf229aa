"""``sessiongate serve`` with two probes, for ``bench_http.py --split-lateness``.

Not the product: a diagnostic launcher that splits the clients' view of expiry lateness
into the part before the request reached the app and the part after its deadline.

* A ``queue_timeout`` answer's body also carries ``created_at``: the wall-clock time of
  the session's arrival stamp (taken as the request's head reached the app, SPEC
  "FIFO"). With the client's own send and receive times that gives *the time before the
  app saw the request* and *the time from the deadline (stamp + max_wait) to the answer
  reaching the client*. The product does not add this field (SPEC: the body adds
  ``waited_s``), hence a probe.
* A Trio instrument records every scheduler pass (its wall-clock start, its length and
  how many task steps it ran) and writes them as JSON to ``$SG_PROBE_OUT`` at exit: under
  a wave of answers every request's next step waits for the whole pass.

It wraps private parts of the web layer (``Service.refusal``, ``Service.run``), so it
may need a touch when those change; the benchmark's other figures never use it.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Any

import trio

from sessiongate.cli import main
from sessiongate.web import _service


class PassRecorder(trio.abc.Instrument):
    """Every scheduler pass that ran at least one task step: (start, seconds, steps)."""

    def __init__(self) -> None:
        self.passes: list[tuple[float, float, int]] = []
        self._start: float | None = None
        self._wall = 0.0
        self._steps = 0

    def after_io_wait(self, timeout: float) -> None:
        self._start = time.perf_counter()
        self._wall = time.time()
        self._steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._steps += 1

    def before_io_wait(self, timeout: float) -> None:
        if self._start is not None and self._steps:
            self.passes.append((self._wall, time.perf_counter() - self._start, self._steps))


RECORDER = PassRecorder()
_refusal = _service.Service.refusal
_run = _service.Service.run


def refusal(self: _service.Service, record: Any) -> Any:
    error = _refusal(self, record)
    if error.code == "queue_timeout":
        error.extra["created_at"] = record.arrival.arrived_at + self.wall_offset
    return error


async def run(self: _service.Service, *args: Any, **kwargs: Any) -> Any:
    trio.lowlevel.add_instrument(RECORDER)
    return await _run(self, *args, **kwargs)


def write_passes() -> None:
    out = os.environ.get("SG_PROBE_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(RECORDER.passes, f)


if __name__ == "__main__":
    _service.Service.refusal = refusal  # type: ignore[method-assign]
    _service.Service.run = run  # type: ignore[method-assign]
    atexit.register(write_passes)
    sys.exit(main())
