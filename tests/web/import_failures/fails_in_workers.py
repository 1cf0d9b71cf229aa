"""A handler module that imports in ``sessiongate serve``'s supervisor and not in its
workers (a module reading what only a worker's environment has, say)."""

import os

if "_SESSIONGATE_WORKER" in os.environ:  # set by the supervisor for its workers
    raise ImportError("only the supervisor has what this module needs")


async def handler(body: dict[str, object], ticket: object) -> object:
    return body
