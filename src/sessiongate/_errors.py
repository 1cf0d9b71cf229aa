"""Why a session was not admitted.

Every refusal is an :class:`AdmissionError`; each subclass carries the figures a caller
needs to answer its own client well (how long it waited, which limit it hit).
"""

from __future__ import annotations


class AdmissionError(Exception):
    """A session was not admitted; it never ran and holds nothing."""

    #: A stable, machine-readable name for the refusal (the HTTP error code).
    code: str = "admission_error"


class QueueTimeout(AdmissionError):
    """The session waited ``max_wait`` seconds in the queue without getting a slot."""

    code = "queue_timeout"

    def __init__(self, waited: float, max_wait: float) -> None:
        super().__init__(f"no slot within {max_wait:g} s (waited {waited:.3f} s)")
        self.waited = waited
        self.max_wait = max_wait

    def __reduce__(self) -> tuple[type[QueueTimeout], tuple[float, float]]:
        # Copied and pickled from its figures, not its message (copy.copy raised).
        return (type(self), (self.waited, self.max_wait))


class QueueFull(AdmissionError):
    """The queue already held ``max_queue`` sessions; the arrival was refused at once."""

    code = "queue_full"

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"the queue is full (max_queue {max_queue})")
        self.max_queue = max_queue

    def __reduce__(self) -> tuple[type[QueueFull], tuple[int]]:
        return (type(self), (self.max_queue,))


class GateClosed(AdmissionError):
    """The gate is draining or closed: it admits nothing new and ends queued sessions."""

    code = "shutting_down"

    def __init__(self, detail: str = "the gate is closing") -> None:
        super().__init__(detail)


class BackendUnavailable(AdmissionError):
    """The backend (Redis) could not be reached; the arrival was refused at once."""

    code = "backend_unavailable"

    def __init__(self, detail: str = "the gate's backend is unreachable") -> None:
        super().__init__(detail)


class LeaseLost(Exception):
    """Distributed mode: the session's slot lease lapsed or could not be renewed.

    Raised out of a running session that the gate had to cancel so that the global
    cap could never be exceeded. It is not an :class:`AdmissionError`: the session was
    admitted and ran for a while.
    """

    code = "lease_lost"
