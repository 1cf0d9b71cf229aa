"""``sessiongate serve`` with the prototype backend of ``_proto_handoff.py`` in place of
the in-memory one: for ``bench_http.py --proto`` only (measures a suggested change)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sessiongate.web._service as service
from _proto_handoff import HandoffBackend
from sessiongate.cli import main

service.MemoryBackend = HandoffBackend  # type: ignore[misc,assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
