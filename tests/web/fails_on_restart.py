"""A handler module that imports until the file named by ``FAIL_IMPORT_IF`` exists (a
worker restarted meanwhile finds a resource gone, or a setting not yet valid)."""

import os

if os.path.exists(os.environ["FAIL_IMPORT_IF"]):
    raise ImportError("the resource this module needs has gone")


async def handler(body: dict[str, object], ticket: object) -> object:
    return body
