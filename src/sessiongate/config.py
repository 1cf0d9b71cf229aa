"""The one settings object of the HTTP service, from CLI flags and ``SESSIONGATE_*`` variables.

Every setting has a flag (``--max-wait``) and a variable (``SESSIONGATE_MAX_WAIT``, the
flag's name in upper snake case); a flag wins over the variable, the variable over the
default. Values arrive as strings and are converted and checked here, once: an invalid
value raises :class:`ConfigError`, whose text is one line naming the setting (the CLI
prints it and exits with status 2).
"""

from __future__ import annotations

import argparse
import decimal
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import attrs

from ._limits import GATE_NAME, MAX_CAPACITY

ENV_PREFIX = "SESSIONGATE_"
#: Variables with the prefix that are not settings: the test suite's switch for its
#: Redis tests, and the redis-server binary it may use.
_OTHER_VARIABLES = frozenset({"SESSIONGATE_TEST_REDIS", "SESSIONGATE_REDIS_SERVER"})
REFUSAL_STATUSES = (503, 429, 408)
_HANDLER_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


class ConfigError(ValueError):
    """A setting has an invalid value; ``str()`` is one line naming the setting."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"invalid {setting}: {reason}")
        self.setting = setting
        self.reason = reason


# -- converters: a string (or an already typed default) to a checked value -------------


#: Plain decimal digits, optionally negative (refused below as out of range): int()
#: would also take "1_000" and other Python spellings.
_WHOLE_NUMBER = re.compile(r"\s*-?([0-9]+)\s*")
#: Most digits a number setting is read with: past any setting's range, and far
#: below int()'s 4300-digit limit.
_MAX_DIGITS = 18


def _too_long(text: str) -> ValueError:
    return ValueError(f"must have at most {_MAX_DIGITS} digits, got {text[:30]!r}")


def _int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        match = _WHOLE_NUMBER.fullmatch(text)
        if match is None:
            raise ValueError(f"must be a whole number >= {minimum}, got {text[:30]!r}")
        digits = match[1].lstrip("0") or "0"
        if len(digits) > _MAX_DIGITS:
            raise _too_long(text)
        value = -int(digits) if text.strip().startswith("-") else int(digits)
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}, got {value}")
        return value

    return convert


#: A plain decimal number, optionally negative (refused below as out of range): float()
#: would also take "1_0", "+5", "1e3", "inf" and non-ASCII digits.
_DECIMAL = re.compile(r"\s*-?(?:([0-9]+)(?:\.[0-9]*)?|\.[0-9]+)\s*")


def _seconds(minimum: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        match = _DECIMAL.fullmatch(text)
        if match is None:
            raise ValueError(f"must be a number of seconds >= {minimum:g}, got {text[:30]!r}")
        value = float(text)  # no exponent, nan or inf in the pattern (a long one is inf)
        if value >= 10**_MAX_DIGITS:
            # Counted on the float, not the text: 999999999999999999 is 1e18 as a
            # float, 19 digits, which the workers (who read it back from the variable
            # it is handed on in) refused (an outside review).
            raise _too_long(text)
        if value < minimum:
            raise ValueError(f"must be >= {minimum:g} seconds, got {value:g}")
        return value

    return convert


def _refusal_status(text: str) -> int:
    value = text.strip()
    if value not in {str(status) for status in REFUSAL_STATUSES}:  # not "5_03", "+503"
        raise ValueError(f"must be one of 503, 429, 408, got {text!r}")
    return int(value)


def _gate_name(text: str) -> str:
    name = text.strip()  # whitespace around a value is ignored, as for every setting
    if not GATE_NAME.fullmatch(name):
        raise ValueError(f"must match [A-Za-z0-9_.-]+, got {text!r}")
    return name


#: Query parameters coredis 6.9 converts with ``int()`` / ``float()`` while it builds
#: its client: a bad one would fail inside coredis at start-up, after validation.
_URL_NUMBERS: dict[str, Callable[[str], float]] = {
    "db": int,
    "max_connections": int,
    "timeout": int,
    "max_idle_time": int,
    "stream_timeout": float,
    "connect_timeout": float,
}
_PASSWORD = re.compile(r"(//[^/@]*?:)[^/@]*@")


def _redacted(text: str) -> str:
    """The URL with its password, if any, replaced: the error line goes to stderr."""
    return _PASSWORD.sub(r"\1***@", text)


def _backend(text: str) -> str:
    """``memory`` or a Redis URL that coredis will take as it stands.

    coredis parses the URL only when the service starts, and a malformed one failed
    there with a long traceback; worse, a db path that is not a number was silently
    db 0. So the URL is checked here, once, as the one-line error the SPEC asks for.
    """
    value = text.strip()
    if value == "memory":
        return value
    shown = _redacted(value)
    try:
        url = urlsplit(value)
    except ValueError as error:  # an unclosed IPv6 bracket, say
        raise ValueError(f"{error}, got {shown!r}") from None
    if url.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must be 'memory' or a redis://, rediss:// or unix:// URL, got {shown!r}")
    if url.scheme == "unix":
        # unix:///path/to/redis.sock?db=N: coredis takes the path and ignores any host.
        if url.hostname is not None or not url.path:
            raise ValueError(f"must be unix:///path/to/socket[?db=N], got {shown!r}")
    else:
        if not url.hostname:
            raise ValueError(f"needs a host, as in redis://host:6379/0, got {shown!r}")
        # A port is checked if there is a colon at all: "host:" with nothing after it is
        # an unset port variable, not "the default port".
        host_port = url.netloc.rpartition("@")[2].rpartition("]")[2]
        _, colon, port = host_port.partition(":")
        if colon and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"port must be a number 1-65535, got {port!r} in {shown!r}")
        if url.path not in ("", "/") and not re.fullmatch(r"/[0-9]+", url.path):
            raise ValueError(
                f"the path must be a database number >= 0 (as in /0), got {url.path!r} in {shown!r}"
            )
    query = parse_qs(url.query)
    db_in_path = url.scheme != "unix" and url.path not in ("", "/")
    if "db" in query and (len(query["db"]) > 1 or db_in_path):
        # coredis takes one of them, silently: redis://host/0?db=3 was db 3 (an outside
        # review).
        raise ValueError(
            f"names its database more than once (the path and ?db=, or ?db= twice), in {shown!r}"
        )
    for name, values in query.items():
        convert = _URL_NUMBERS.get(name)
        if convert is None:
            continue
        try:
            number = convert(values[0])
        except ValueError:
            number = -1
        if not 0 <= number < math.inf:
            raise ValueError(f"{name} must be a number >= 0, got {values[0]!r} in {shown!r}")
    return value


def _handler(text: str) -> str:
    value = text.strip()
    if value == "sleep" or _HANDLER_PATH.fullmatch(value):
        return value
    raise ValueError(f"must be 'sleep' or 'package.module:function', got {text!r}")


def _bind(text: str) -> str:
    value = text.strip()
    if value.startswith("unix:"):
        if len(value) == len("unix:"):
            raise ValueError("unix: needs a socket path (unix:/run/sessiongate.sock)")
        return value
    if value.startswith("fd://"):
        if not value[len("fd://") :].isdigit():
            raise ValueError(f"fd:// needs a file descriptor number, got {text!r}")
        return value
    host, sep, port = value.rpartition(":")
    # A host with a colon is an IPv6 address, and then in brackets ([::1]:8000).
    bare_colon = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not sep or not host or bare_colon or not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT (or unix:PATH, fd://N), got {text!r}")
    return value


_PORT = re.compile(r"[0-9]{1,5}")


def _token(text: str) -> str | None:
    # Whitespace around a value is ignored, as for every setting: only blanks is none.
    return text.strip() or None


@attrs.frozen
class _Option:
    name: str  # the attribute
    convert: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


_OPTIONS = (
    _Option("bind", _bind, "address to listen on: HOST:PORT, unix:PATH or fd://N"),
    _Option("capacity", _int(1, MAX_CAPACITY), "most sessions active at once"),
    _Option("max_wait", _seconds(0), "most seconds a session waits for a slot (0: never)"),
    _Option("max_queue", _int(0), "most sessions waiting at once (0: no queue)"),
    _Option("handler", _handler, "'sleep' or package.module:function"),
    _Option("max_duration", _seconds(0), "largest 'duration' the sleep handler accepts"),
    _Option("max_body", _int(1), "largest request body, bytes"),
    _Option("workers", _int(1), "worker processes (more than 1 needs a redis backend)"),
    _Option("backend", _backend, "'memory' or redis://host:port/db"),
    _Option("gate_name", _gate_name, "the gate's name in a shared backend"),
    _Option("lease_ttl", _seconds(1), "seconds a Redis slot lease lives unrenewed"),
    _Option("thread_limit", _int(1), "threads for plain-def handlers"),
    _Option("shutdown_grace", _seconds(0), "seconds active sessions get on SIGTERM"),
    _Option("result_ttl", _seconds(0), "seconds an ended session stays readable"),
    _Option("result_max", _int(0), "most ended sessions kept readable"),
    _Option("admin_token", _token, "bearer token for GET /sessions and /admin/*"),
    _Option("refusal_status", _refusal_status, "status of refusals: 503, 429 or 408"),
)
_BY_NAME = {option.name: option for option in _OPTIONS}


def _flags(argv: Sequence[str]) -> dict[str, str]:
    """The ``serve`` flags given, by setting name."""
    namespace = _parser().parse_args(list(argv))
    return {name: value for name, value in vars(namespace).items() if value is not None}


def _source(name: str, flags: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """Where a setting's value came from, as errors name it: its flag, else its
    variable, else (the default) its flag."""
    option = _BY_NAME[name]
    return option.env if name not in flags and option.env in environ else option.flag


@attrs.frozen
class Settings:
    """Everything the service is configured with. Build it with a named constructor."""

    bind: str = "127.0.0.1:8000"
    capacity: int = 50
    max_wait: float = 60.0
    max_queue: int = 10_000
    handler: str = "sleep"
    max_duration: float = 3600.0
    max_body: int = 65_536
    workers: int = 1
    backend: str = "memory"
    gate_name: str = "default"
    lease_ttl: float = 10.0
    thread_limit: int = 40
    shutdown_grace: float = 30.0
    result_ttl: float = 300.0
    result_max: int = 10_000
    admin_token: str | None = attrs.field(default=None, repr=False)
    refusal_status: int = 503

    @property
    def redis(self) -> bool:
        """True when the gate lives in Redis (shared by every worker and host)."""
        return self.backend != "memory"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from ``SESSIONGATE_*`` variables, defaults for the rest.

        Raises:
            ConfigError: a variable has an invalid value.
        """
        return cls._build({}, environ)

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
        """Settings from ``serve`` flags, then ``SESSIONGATE_*`` variables, then defaults.

        Raises:
            ConfigError: a flag or variable has an invalid value, or an unknown flag.
        """
        return cls._build(_flags(argv), environ)

    @staticmethod
    def source_of(name: str, argv: Sequence[str], environ: Mapping[str, str]) -> str:
        """The flag or variable setting ``name``'s value came from (for an error that
        only shows later, as a handler that does not import)."""
        return _source(name, _flags(argv), environ)

    @staticmethod
    def flags_given(argv: Sequence[str]) -> frozenset[str]:
        """The names of the settings ``argv`` (``serve``'s flags) sets."""
        return frozenset(_flags(argv))

    @classmethod
    def _build(cls, flags: Mapping[str, str], environ: Mapping[str, str]) -> Settings:
        values: dict[str, Any] = {}
        for option in _OPTIONS:
            if option.name in flags:
                text, source = flags[option.name], option.flag
            elif option.env in environ:
                text, source = environ[option.env], option.env
            else:
                continue
            try:
                values[option.name] = option.convert(text)
            except ValueError as error:
                raise ConfigError(source, str(error)) from None
        settings = cls(**values)
        if settings.workers > 1 and not settings.redis:
            source = _source("workers", flags, environ)
            raise ConfigError(
                source,
                f"{settings.workers} workers need a shared backend (--backend redis://...); "
                "with the in-memory backend each worker would have its own cap",
            )
        return settings

    @staticmethod
    def unknown_variables(environ: Mapping[str, str]) -> list[str]:
        """``SESSIONGATE_*`` variables that name no setting (a typo is otherwise silent)."""
        known = {option.env for option in _OPTIONS} | _OTHER_VARIABLES
        return sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known)

    def to_environ(self) -> dict[str, str]:
        """These settings as ``SESSIONGATE_*`` variables (to hand to a worker process)."""
        environ: dict[str, str] = {}
        for option in _OPTIONS:
            value = getattr(self, option.name)
            if value is None:
                continue
            environ[option.env] = _plain(value) if isinstance(value, float) else str(value)
        return environ


def _plain(value: float) -> str:
    """``value`` as the plain decimal a setting is read from, exactly: its shortest
    repr's digits without an exponent. repr gave "1e-05" for ``--max-wait 0.00001``,
    which the workers' own parsing refused, so none of them started (an outside
    review)."""
    return format(decimal.Decimal(repr(value)), "f")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (ConfigError), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("arguments", message)


#: The end of ``sessiongate serve --help``.
_EPILOG = (
    "Every option can also be set by its SESSIONGATE_* variable (shown with each); a "
    "flag wins over its variable. An invalid value stops start-up with one line naming "
    "the setting (exit status 2)."
)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="sessiongate serve", add_help=True, allow_abbrev=False, epilog=_EPILOG
    )
    defaults = attrs.fields_dict(Settings)
    for option in _OPTIONS:
        default = defaults[option.name].default
        shown = (
            "none" if default is None else f"{default:g}" if isinstance(default, float) else default
        )
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.name.split("_")[-1].upper(),
            help=f"{option.help} (default: {shown}; {option.env})",
        )
    return parser


def serve_help() -> str:
    """The ``sessiongate serve --help`` text."""
    return _parser().format_help()
