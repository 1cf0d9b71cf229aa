"""Where a gate keeps its slots and its queue: in this process, or in Redis."""

from ._base import Backend as Backend
from .memory import MemoryBackend as MemoryBackend

__all__ = ["Backend", "MemoryBackend"]
