"""Session handlers: the built-in ``sleep`` demo and user handlers by import path.

A handler is called as ``handler(body, ticket)`` with the parsed JSON object and the
session's :class:`~sessiongate.Ticket`; its return value is the session's result. An
``async def`` runs in the session's own task and scope (so cancelling the session
cancels it); a plain ``def`` runs in a worker thread through ``trio.to_thread`` under one
shared ``trio.CapacityLimiter`` of ``--thread-limit`` threads. A cancelled thread is
abandoned (the session frees its slot at once); the thread keeps its limiter token until
it really returns, so the thread limit holds.

Long-lived resources: the handler module is imported once at start-up. A handler may
also carry a ``lifespan`` attribute, an async context manager factory taking no
arguments; the app enters it once before serving and leaves it after the drain (open
clients and pools there, never per session).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import trio

from .._gate import Ticket
from ._errors import ApiError

HandlerFn = Callable[[dict[str, Any], Ticket], Any]

DEFAULT_SLEEP = 5.0


class HandlerLoadError(Exception):
    """The ``--handler`` import path does not name a callable."""


def load(path: str) -> HandlerFn | None:
    """Import ``package.module:function``; ``None`` for the built-in ``sleep``.

    Raises:
        HandlerLoadError: the module or attribute is missing or not callable.
    """
    if path == "sleep":
        return None
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except BaseException as error:  # ImportError, or anything the module raised (exit() too)
        # One line, whatever the module's message: start-up errors are one line each.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise HandlerLoadError(f"cannot import {module_name!r}: {reason}") from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerLoadError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise HandlerLoadError(f"{path!r} is not callable")
    fn: HandlerFn = target
    return fn


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an instance with an async __call__
    )


@attrs.define
class Handler:
    """How sessions run: the user function (or ``sleep``) and the thread limiter."""

    fn: HandlerFn | None
    max_duration: float
    thread_limiter: trio.CapacityLimiter

    @classmethod
    def from_settings(cls, path: str, max_duration: float, thread_limit: int) -> Handler:
        return cls(load(path), max_duration, trio.CapacityLimiter(thread_limit))

    def validate(self, body: dict[str, Any]) -> None:
        """Check what can be checked before a session exists (the sleep ``duration``).

        Raises:
            ApiError: ``invalid_request`` (422).
        """
        if self.fn is not None or "duration" not in body:
            return
        duration = body["duration"]
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            raise ApiError("invalid_request", "'duration' must be a number of seconds")
        if not 0 <= duration <= self.max_duration:
            raise ApiError(
                "invalid_request",
                f"'duration' must be between 0 and {self.max_duration:g} seconds",
            )

    def lifespan(self) -> AbstractAsyncContextManager[Any] | None:
        factory = getattr(self.fn, "lifespan", None)
        if factory is None:
            return None
        manager: AbstractAsyncContextManager[Any] = factory()
        return manager

    async def __call__(self, body: dict[str, Any], ticket: Ticket) -> Any:
        fn = self.fn
        if fn is None:
            # The default never exceeds --max-duration: it bounds every sleep.
            duration = float(body.get("duration", min(DEFAULT_SLEEP, self.max_duration)))
            if duration > 0:
                await trio.sleep(duration)
            else:  # a zero-length session: nothing to wait for, but still cancellable
                await trio.lowlevel.checkpoint_if_cancelled()
            return {"data": body}
        if _is_async(fn):
            awaitable: Awaitable[Any] = fn(body, ticket)
            return await awaitable
        return await trio.to_thread.run_sync(
            fn, body, ticket, limiter=self.thread_limiter, abandon_on_cancel=True
        )
