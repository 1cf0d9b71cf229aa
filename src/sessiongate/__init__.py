"""sessiongate: a structured-concurrency session admission gate for Trio.

At most ``capacity`` sessions run at once; the rest wait in a FIFO queue for at most
``max_wait`` seconds::

    gate = sessiongate.Gate(capacity=50, max_wait=60.0, max_queue=10_000)
    async with gate.session() as ticket:
        ...  # the slot is held here
"""

from ._errors import AdmissionError as AdmissionError
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import GateClosed as GateClosed
from ._errors import LeaseLost as LeaseLost
from ._errors import QueueFull as QueueFull
from ._errors import QueueTimeout as QueueTimeout
from ._gate import Gate as Gate
from ._gate import Ticket as Ticket
from ._stats import GateStats as GateStats
from .backends import Backend as Backend
from .backends import MemoryBackend as MemoryBackend

__version__ = "0.1.0"

__all__ = [
    "AdmissionError",
    "Backend",
    "BackendUnavailable",
    "Gate",
    "GateClosed",
    "GateStats",
    "LeaseLost",
    "MemoryBackend",
    "QueueFull",
    "QueueTimeout",
    "Ticket",
    "__version__",
]
