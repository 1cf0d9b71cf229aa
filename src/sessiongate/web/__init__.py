"""The HTTP service: a Quart-Trio app that serves a :class:`sessiongate.Gate`.

``create_app()`` builds it from ``SESSIONGATE_*`` variables (or a
:class:`~sessiongate.config.Settings`); ``sessiongate serve`` runs it under Hypercorn.
"""

from ._app import SessionGateApp as SessionGateApp
from ._app import create_app as create_app
from ._handlers import HandlerLoadError as HandlerLoadError
from ._service import StartRefused as StartRefused

__all__ = ["HandlerLoadError", "SessionGateApp", "StartRefused", "create_app"]
