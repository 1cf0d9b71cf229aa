"""``sessiongate serve``: the HTTP service under Hypercorn's Trio worker.

One worker (the default) serves in this process. On SIGTERM or SIGINT it drains first,
with the listener still open: new sessions are refused with ``shutting_down``, queued
ones end at once, active ones get ``--shutdown-grace`` seconds and are then cancelled.
Only then is Hypercorn told to stop (answers still being written get what is left of
the grace, at least 2 s); the process exits 0. A second signal ends the grace now.

``--workers N`` (Redis backend only) runs N worker processes on one listening socket,
supervised here rather than by Hypercorn's runner (which stops the other workers as
soon as one exits, cutting their drain short): a signal is passed to every worker, each
drains within the grace, and a worker that dies otherwise is restarted.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio

from . import __version__
from .config import ConfigError, Settings, serve_help

if TYPE_CHECKING:
    from hypercorn.logging import Logger

log = logging.getLogger("sessiongate.cli")

USAGE = (
    "usage: sessiongate serve [options]   "
    "(sessiongate serve --help for the options; sessiongate --version)"
)
#: After the grace, how long a worker may take to exit before it is killed (a worker's
#: stop takes the grace, then at most PEER_DRAIN_MARGIN + ANSWERS_MIN).
KILL_MARGIN = 10.0
#: Seconds before a dead worker is started again; doubled for each start in a row that
#: failed (a worker that exits within START_WINDOW seconds of its start).
RESTART_DELAY = 1.0
START_WINDOW = 10.0
#: Failed starts in a row after which the supervisor stops everything and exits 1: a
#: worker that cannot start (a handler's resource missing) is not retried for ever,
#: with the port open and nothing served (an outside review: a restart every 1.5 s,
#: then exit 0 on SIGTERM, so no process manager saw the failure).
START_ATTEMPTS = 3


#: Set by ``serve --workers N`` for its workers: the settings the command line gave as
#: flags, comma-separated (the workers get every setting as a variable), so that a
#: worker's one-line refusal names the setting as it was given.
FLAGS_ENV: Final = "_SESSIONGATE_FLAGS"


def _source_of(name: str, argv: Sequence[str]) -> str:
    """The flag or variable that gave setting ``name`` (a worker's too)."""
    environ: Mapping[str, str] = os.environ
    flagged = environ.get(FLAGS_ENV)
    if flagged:
        given = {f"SESSIONGATE_{flag.upper()}" for flag in flagged.split(",")}
        environ = {key: value for key, value in environ.items() if key not in given}
    return Settings.source_of(name, argv, environ)


#: Seconds the start waits for Redis to answer the configuration check; one that does
#: not answer is an outage, not an error (the service starts, refusing, and recovers).
REDIS_CHECK_LIMIT: Final = 0.5


async def _check_redis(settings: Settings) -> None:
    """Refuse the start (one line, status 2) if Redis refuses this configuration."""
    from .backends.redis import RedisRefused, check_redis
    from .web import StartRefused

    try:
        await check_redis(settings.backend, gate_name=settings.gate_name, limit=REDIS_CHECK_LIMIT)
    except RedisRefused as error:
        raise StartRefused(str(error), setting="backend") from None


def _fail(message: str, status: int = 2) -> int:
    print(f"sessiongate: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"sessiongate {__version__}")
        return 0
    if args[0] != "serve":
        return _fail(f"unknown command {args[0]!r}; {USAGE}")
    if any(arg in ("-h", "--help") for arg in args[1:]):
        print(serve_help())
        return 0
    with _signals_noted_while_starting():
        return _serve_command(args)


#: SIGTERM/SIGINT received while ``sessiongate serve`` was starting (importing the web
#: stack, checking Redis), before the server's own handling listens: it drains as soon
#: as it does (exit 0). Python's defaults ended the process with status 143, or a
#: KeyboardInterrupt traceback (an outside review).
_early_signals: list[int] = []


@contextlib.contextmanager
def _signals_noted_while_starting() -> Iterator[None]:
    """The first signal is noted; a second one takes its default action at once (a
    start that hangs, in a handler module's import say, can still be stopped)."""

    def note(signum: int, frame: object) -> None:
        if _early_signals:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        _early_signals.append(signum)

    _early_signals.clear()
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_command(args: list[str]) -> int:
    try:
        settings = Settings.from_args(args[1:], os.environ)
    except ConfigError as error:
        return _fail(str(error))
    # The server's parts come with extras: without them, one line (not an ImportError's
    # traceback) says which to install.
    missing = _missing_extra(settings)
    if missing is not None:
        return _fail(missing)
    # Like hypercorn and gunicorn: a --handler module in the working directory imports.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from .web import HandlerLoadError, StartRefused
    from .web._handlers import load
    from .web._peers import WORKER_ENV

    try:
        load(settings.handler)
    except HandlerLoadError as error:
        # Named as given, like every other setting.
        return _fail(f"invalid {_source_of('handler', args[1:])}: {error}")
    configure_logging()
    for name in Settings.unknown_variables(os.environ):
        log.warning("ignoring %s: no setting has this name (see sessiongate serve --help)", name)
    try:
        if settings.redis and WORKER_ENV not in os.environ:  # a worker's supervisor did it
            # Before anything serves (or each worker refuses, one line each, and is
            # restarted to no avail): a Redis that refuses this configuration.
            trio.run(_check_redis, settings)
        if settings.workers > 1:
            return trio.run(_supervise, settings, Settings.flags_given(args[1:]))
        _tune_gc()
        trio.run(serve, settings)
    except StartRefused as refused:
        if refused.setting is None:
            return _fail(refused.reason, 1)
        source = _source_of(refused.setting, args[1:])
        return _fail(f"invalid {source}: {refused.reason}")
    except OSError as error:
        return _fail(f"cannot serve on {settings.bind}: {error}", 1)
    except BaseExceptionGroup as group:
        # Hypercorn binds inside its nurseries: a bind error comes wrapped.
        matched, rest = group.split(OSError)
        if matched is None or rest is not None:
            raise
        return _fail(f"cannot serve on {settings.bind}: {_leaf(matched)}", 1)
    return 0


#: The modules each extra brings, by extra: what ``sessiongate serve`` cannot run without.
EXTRA_MODULES: Final = {
    "web": ("quart", "quart_trio", "hypercorn", "prometheus_client", "httpx"),
    "redis": ("coredis",),
}


def _missing_extra(settings: Settings) -> str | None:
    """Why ``serve`` cannot run with these settings in this environment, if it cannot:
    an extra not installed (without ``web``, ``serve`` died with a ModuleNotFoundError;
    without ``redis``, a Redis backend with a 128-line lifespan traceback: an outside
    review)."""
    needed = ["web", "redis"] if settings.redis else ["web"]
    for extra in needed:
        absent = [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
        if absent:
            what = "a redis:// --backend" if extra == "redis" else "sessiongate serve"
            return (
                f"{what} needs the {extra!r} extra (missing: {', '.join(absent)}): "
                f"pip install '.[{extra}]' in a checkout of sessiongate"
            )
    return None


#: Allocations between young collections (CPython's default is 700). Every request
#: allocates a few thousand container objects, most of them freed by reference counting
#: within the request; with the default, a zero-length request paid ~0.1 ms of cyclic GC
#: (0.6-0.7 s of GC per ~6 000 requests, measured in-process); with 10 000, ~0.02 ms.
#: Those collections are made when the run loop is idle (``web/_idle.py``: CPython's own,
#: at whichever allocation crossed the threshold, took 7-47 ms in the middle of an expiry
#: wave); CPython's threshold, five times higher, is the backstop for a loop never idle.
GC_IDLE_YOUNG = 10_000
GC_THRESHOLDS = (50_000, 20, 100)


def _tune_gc() -> None:
    """Once, before serving: start-up objects (modules, the app) leave the collector's
    generations for good (``gc.freeze``), and young collections run less often (and,
    from :func:`serve` on, when the loop is idle)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def collect_garbage_when_idle() -> None:
    """In the current Trio run, collect garbage when the loop is idle (``_tune_gc``)."""
    from .web._idle import collect_garbage_when_idle as when_idle

    when_idle(GC_IDLE_YOUNG)


#: Library loggers kept at WARNING unless something set their level already. httpx (a
#: worker passing a request to a sibling) logs every request at INFO. coredis
#: logs every connection retry at INFO ("Retry attempt 1 due to error: Unable to establish
#: a connection ..."): about 8 lines a second per process for as long as Redis is down.
#: The Redis backend logs an outage itself, once as it starts and once as it ends.
QUIET_LOGGERS: Final = ("coredis", "httpx")


#: The application log's line: ``2026-12-03 13:57:08,253 [5096] INFO sessiongate.web: ...``.
LOG_FORMAT: Final = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class _PerSecond:
    """A local time formatted with ``fmt`` once a second, not once a log line
    (``time.strftime`` was a third of a line's cost; every request and every session
    end writes one)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._second = -1
        self._text = ""

    def __call__(self, at: float) -> str:
        second = int(at)
        if second != self._second:
            self._text = time.strftime(self.fmt, time.localtime(at))
            self._second = second
        return self._text


class LineFormatter(logging.Formatter):
    """The standard formatter, with the date and time of day formatted once a second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._date_time = _PerSecond(self.default_time_format)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.default_msec_format is None:
            return super().formatTime(record, datefmt)
        return self.default_msec_format % (self._date_time(record.created), record.msecs)


def configure_logging() -> None:
    """The service's logging: INFO and up to stderr, one line per record, with the
    libraries in :data:`QUIET_LOGGERS` held at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    quiet_library_loggers()
    _tune_logging()


def quiet_library_loggers() -> None:
    """Set the loggers in :data:`QUIET_LOGGERS` to WARNING, unless a level was set for
    one already (a deployment's own logging configuration wins), and keep coredis's
    failed connection attempts out (:func:`_not_a_connect_failure`)."""
    for name in QUIET_LOGGERS:
        library = logging.getLogger(name)
        if library.level == logging.NOTSET:
            library.setLevel(logging.WARNING)
    logging.getLogger("coredis").addFilter(_not_a_connect_failure)  # added once only


def _not_a_connect_failure(record: logging.LogRecord) -> bool:
    """coredis logs every connection attempt to a Redis that does not answer in time (a
    stalled one) at ERROR, with a ~60-line traceback, before it raises the
    ``ConnectionError`` that the Redis backend handles and reports once per outage."""
    return record.msg != "Connection attempt failed unexpectedly!"


def _tune_logging() -> None:
    """Log records without what no format here prints: the caller's file and line
    (finding it walks the stack for every record, and the access log writes one per
    request), the thread's name and the multiprocessing name. The logging HOWTO's
    "Optimization" section names these switches."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


def _leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _access_logger_class() -> type[Logger]:
    """Hypercorn's logger with a cheaper access line (the same text as its default).

    Hypercorn builds its access-log atoms eagerly for every request: every request and
    response header and a copy of the whole process environment (``{name}e`` atoms),
    whatever the format uses. That was about a third of a zero-length request's cost.
    This logger writes Hypercorn's default format,
    ``%(h)s %(l)s %(l)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"``, from the few
    values it needs, with the timestamp formatted once a second.
    """
    from hypercorn.logging import Logger

    from .web._idle import log_when_idle

    class AccessLogger(Logger):
        _stamp = _PerSecond("[%d/%b/%Y:%H:%M:%S %z]")

        async def access(self, request: Any, response: Any, request_time: float) -> None:
            logger = self.access_logger
            if logger is None or not logger.isEnabledFor(logging.INFO):
                return
            client = request.get("client")
            if client is None:
                remote = None
            elif len(client) == 2:
                remote = f"{client[0]}:{client[1]}"
            elif len(client) == 1:
                remote = client[0]
            else:
                remote = f"<???{client}???>"
            referer = agent = length = "-"
            for name, value in request["headers"]:
                lowered = name.lower()
                if lowered == b"referer":
                    referer = value.decode("latin1")
                elif lowered == b"user-agent":
                    agent = value.decode("latin1")
            status = "-"
            if response is not None:
                status = str(response["status"])
                for name, value in response.get("headers", ()):
                    if name.lower() == b"content-length":
                        length = value.decode("latin1")
            method = request["method"] if request["type"] == "http" else "GET"
            log_when_idle(
                logger,
                logging.INFO,
                '%s - - %s "%s %s %s" %s %s "%s" "%s"',
                remote,
                self._stamp(time.time()),
                method,
                request["path"],
                request.get("http_version", "ws"),
                status,
                length,
                referer,
                agent,
            )

    return AccessLogger


def hypercorn_config(settings: Settings) -> object:
    from hypercorn.config import Config

    config = Config()
    config.logger_class = _access_logger_class()
    config.bind = [settings.bind]
    # Hypercorn's error log goes through the application's logging (stderr); its
    # access log to stdout, one line per request.
    config.errorlog = logging.getLogger("hypercorn.error")
    access = logging.getLogger("hypercorn.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    config.accesslog = access
    config.backlog = 2048  # bursts of clients, as in the article's load, must not be reset
    # After the drain only answers still being written remain; the grace bounds them.
    config.graceful_timeout = max(settings.shutdown_grace, 1.0)
    return config


async def serve(
    settings: Settings, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until SIGTERM/SIGINT, drain, and return (``task_status`` gets the binds)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    from .web import create_app
    from .web._hypercorn_fix import cut_stalled_sends
    from .web._idle import keep_order
    from .web._peers import note_stopping

    collect_garbage_when_idle()
    keep_order(log)  # "SIGTERM: draining" after the lines of sessions ended before it
    app = create_app(settings)
    config = hypercorn_config(settings)
    assert isinstance(config, Config)
    peers = app.service.peers
    if peers is not None:
        # A worker of several: also serve its siblings on a private socket (_peers.py).
        private = peers.socket_path()
        private.unlink(missing_ok=True)  # left by this worker's previous life
        peers.note_running()
        config.bind = [*config.bind, f"unix:{private}"]
    stop = trio.Event()

    draining = False
    grace_ends = math.inf  # set as the drain starts; a second signal moves it to now
    answers: trio.CancelScope | None = None  # the time answers still being written get
    siblings: trio.CancelScope | None = None  # a drained worker's wait for its siblings

    async def drain_then_stop() -> None:
        nonlocal draining, grace_ends, answers, siblings
        if draining:
            return
        draining = True
        if not app.service.started:
            # Still starting (a handler's lifespan opening its resources): nothing to
            # drain, and Hypercorn looks at its stop trigger only once it serves.
            log.info("stopped while starting")
            nursery.cancel_scope.cancel()
            return
        grace_ends = min(grace_ends, trio.current_time() + settings.shutdown_grace)
        await app.service.drain()
        if app.service.peers is not None:
            # Answers passed on from sibling workers (event streams) end when their
            # owners' drains end them: let their final events through first. And this
            # worker's sessions stay readable (rejected, cancelled: passed on from a
            # sibling still draining) until every sibling's drain is over.
            # (Only when the supervisor stops them all: one worker stopped alone exits,
            # and the supervisor starts another.) A second signal ends the wait.
            app.service.peers.note_drained()
            with trio.CancelScope(deadline=grace_ends + PEER_DRAIN_MARGIN) as siblings:
                if app.service.peers.all_stopping():
                    await app.service.peers.wait_siblings_drained()
                await app.service.peers.wait_idle()
            siblings = None
        # Answers still being written get what is left of the grace, at least
        # ANSWERS_MIN: the whole stop takes the grace and a little more, not twice the
        # grace (outside review: 12 s with a grace of 6 and one slow reader).
        config.graceful_timeout = max(grace_ends - trio.current_time(), ANSWERS_MIN)
        drained_at = trio.current_time()
        stop.set()
        # Hypercorn then gives them its graceful timeout; a write that a client is not
        # taking (it stopped reading) would outlast it. A second signal shortens it.
        with trio.move_on_after(config.graceful_timeout) as answers:
            await trio.sleep_forever()
        cut_stalled_sends()
        # Hypercorn has stopped, and the app's lifespan (the sessions nursery, the
        # handler's resources) ends after it, each within moments, unless something
        # ignores cancellation: a session abandoned at the cut, a handler's lifespan
        # that blocks as it closes. The stop is bounded all the same (an outside review:
        # such a session held the exit for 30 s with a grace of 2).
        await trio.sleep(EXIT_BOUND)
        _exit_anyway(peers, trio.current_time() - drained_at)

    async def watch_supervisor(fd: int) -> None:
        # A supervised worker reads the lifeline pipe its supervisor holds open and never
        # writes: end of file means the supervisor is gone (even SIGKILLed), and a worker
        # must not outlive it holding the port.
        async with trio.lowlevel.FdStream(fd) as lifeline:
            while await lifeline.receive_some():
                pass
        log.warning("the supervisor is gone: draining")
        if peers is not None:
            # All the workers stop: they wait for each other's drains as under a
            # supervisor's stop, and the last one out removes the directory.
            peers.orphaned = True
            note_stopping(peers.directory)
        await drain_then_stop()

    async def on_signals(*, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            received = 0
            if _early_signals:
                received = 1
                log.info("%s while starting: draining", signal.Signals(_early_signals[0]).name)
                nursery.start_soon(drain_then_stop)
            async for signum in signals:
                received += 1
                if received == 1:
                    log.info("%s: draining", signal.Signals(signum).name)
                    nursery.start_soon(drain_then_stop)
                else:
                    name = signal.Signals(signum).name
                    if received == 2:
                        log.info("%s again: ending the grace now", name)
                    else:  # the grace has ended already: say so, once per signal
                        log.info("%s again: the grace has ended already", name)
                    nonlocal grace_ends
                    grace_ends = min(grace_ends, trio.current_time())  # a third moves nothing
                    app.service.cut()
                    if siblings is not None:
                        siblings.deadline = trio.current_time()
                    # Answers still being written get ANSWERS_MIN from now, no more.
                    if answers is not None:
                        answers.deadline = min(answers.deadline, trio.current_time() + ANSWERS_MIN)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(on_signals)
            lifeline = os.environ.get(LIFELINE_ENV)
            if lifeline is not None:
                nursery.start_soon(watch_supervisor, int(lifeline))
            # Returns once the app's lifespan has shut down (after the drain).
            await hypercorn_serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
            nursery.cancel_scope.cancel()
    except BaseException:
        # The app refused to start (Hypercorn wraps it as a lifespan failure, in groups):
        # its one-line reason, not the wrapping's tracebacks.
        if app.service.start_refused is not None:
            raise app.service.start_refused from None
        raise
    if peers is not None:
        peers.leave()


#: Seconds the app gets to stop once Hypercorn's answers are out (or abandoned) before
#: the process exits without it.
EXIT_BOUND: Final = 2.0


def _exit_anyway(peers: Any, since_drain: float) -> NoReturn:
    """Exit 0 now, though the app has not stopped: the drain is over (every caller has
    its answer), and what still runs ignores cancellation."""
    log.error(
        "the app has not stopped %.1fs after its drain (a session or a handler's lifespan "
        "ignores cancellation); exiting without it",
        since_drain,
    )
    if peers is not None:
        peers.leave()
    from .web._idle import write_logs_now

    write_logs_now()  # lines waiting for an idle moment (web/_idle.py) first
    logging.shutdown()  # flush the log first: os._exit does not
    sys.stdout.flush()
    os._exit(0)


# -- several workers -----------------------------------------------------------------

#: Seconds beyond the grace a worker waits for answers passed on from its siblings.
PEER_DRAIN_MARGIN: Final = 2.0

#: Seconds answers still being written get after the drain, when the drain used up the
#: grace (otherwise they get what is left of it).
ANSWERS_MIN: Final = 2.0

#: Names the read end of the supervisor's lifeline pipe in a worker's environment.
LIFELINE_ENV = "_SESSIONGATE_LIFELINE_FD"


def _listen(bind: str) -> socket.socket:
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def _supervise(settings: Settings, flags: frozenset[str] = frozenset()) -> int:
    """Run ``settings.workers`` worker processes on one socket; drain all on a signal.
    ``flags``: the settings given as flags (for the workers' error lines)."""
    if settings.bind.startswith(("unix:", "fd://")):
        raise OSError("--workers > 1 needs a HOST:PORT bind")
    from .web._peers import PEERS_ENV, WORKER_ENV, note_stopping

    sock = _listen(settings.bind)
    fd = sock.fileno()
    host, port = sock.getsockname()[:2]
    print(
        f"sessiongate: serving http://{host}:{port} with {settings.workers} workers",
        file=sys.stderr,
        flush=True,
    )
    env = {**os.environ, **settings.to_environ()}
    env.pop("SESSIONGATE_ADMIN_TOKEN", None)
    if settings.admin_token is not None:
        env["SESSIONGATE_ADMIN_TOKEN"] = settings.admin_token
    # The lifeline: workers inherit its read end; the supervisor holds the write end
    # (not inherited) until it exits, however it exits.
    lifeline_read, lifeline_write = os.pipe()
    env[LIFELINE_ENV] = str(lifeline_read)
    # Each worker's private socket, for its siblings to pass on requests for its
    # sessions (web/_peers.py); the directory goes when the supervisor does.
    peers_dir = tempfile.mkdtemp(prefix="sessiongate-workers-")
    env[PEERS_ENV] = peers_dir
    env[FLAGS_ENV] = ",".join(sorted(flags))
    command = [sys.executable, "-m", "sessiongate.cli", "serve", "--bind", f"fd://{fd}"]
    command += ["--workers", "1"]
    stopping = trio.Event()
    spawning = trio.Lock()
    given_up = trio.Event()
    processes: dict[int, trio.Process] = {}
    failures = 0
    refused = False  # a worker refused its settings as it started (exit status 2)

    async def worker(index: int) -> None:
        nonlocal failures, refused
        failed_starts = 0
        first = True  # this worker's first start (settings refused show there)
        while not stopping.is_set():
            started = trio.current_time()
            async with spawning:  # the socket is not closed under a spawn (stop_all)
                if stopping.is_set():
                    return
                process = await trio.lowlevel.open_process(
                    command,
                    env={**env, WORKER_ENV: str(index)},
                    pass_fds=(fd, lifeline_read),
                    start_new_session=True,
                )
            processes[index] = process
            if stopping.is_set():  # the signal came while this worker was starting
                process.send_signal(signal.SIGTERM)
            # Shielded: a worker is only ever stopped by a signal, never abandoned.
            with trio.CancelScope(shield=True):
                status = await process.wait()
            if stopping.is_set():
                # A worker still starting when the signal came dies of it, holding no
                # session: that is a clean stop too.
                if status not in (0, -signal.SIGTERM, -signal.SIGINT):
                    failures += 1
                return
            failed_starts = failed_starts + 1 if trio.current_time() - started < START_WINDOW else 0
            if first and failed_starts and status == 2:
                # A setting refused as the worker first started (its line is said):
                # another start would be refused the same way. Not on a restart: the
                # others serve, and whatever refused it (a Redis password being
                # rotated) may pass (an outside review: one restart stopped it all).
                log.error("worker %d refused its settings as it started: stopping", index)
                refused = True
                given_up.set()
                return
            first = False
            if failed_starts >= START_ATTEMPTS:
                log.error(
                    "worker %d exited with status %s, %d times in a row within %gs of its "
                    "start: stopping",
                    index,
                    status,
                    failed_starts,
                    START_WINDOW,
                )
                failures += 1
                given_up.set()
                return
            delay = RESTART_DELAY * 2 ** max(failed_starts - 1, 0)
            log.warning("worker %d exited with status %s; restarting in %gs", index, status, delay)
            with trio.move_on_after(delay):
                await stopping.wait()

    async def stop_all(signum: int) -> None:
        stopping.set()
        note_stopping(peers_dir)  # each worker's sessions readable until all have drained
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signum)
        # No worker starts from now on, so the listening socket is the workers' alone:
        # it closes with the last of their listeners, after their drains, and new
        # connections are then refused. Held here, it took connections that nobody
        # would ever accept while a stop lingered, and reset them at the exit (an
        # outside review: up to 4 s with a handler that ignored cancellation).
        async with spawning:
            sock.close()
        with trio.move_on_after(settings.shutdown_grace + KILL_MARGIN):
            for process in processes.values():
                await process.wait()
            return
        for process in processes.values():
            if process.returncode is None:
                log.error("worker %d did not drain in time; killing it", process.pid)
                process.kill()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:

            async def relay() -> None:
                async for signum in signals:
                    if not stopping.is_set():
                        outer.start_soon(stop_all, signum)
                    else:  # a second signal: pass it on (ends the workers' grace)
                        for process in processes.values():
                            if process.returncode is None:
                                process.send_signal(signum)

            async def give_up() -> None:
                await given_up.wait()
                if not stopping.is_set():
                    await stop_all(signal.SIGTERM)

            outer.start_soon(relay)
            if _early_signals:  # before the receiver listened: no worker starts
                log.info("%s while starting: stopping", signal.Signals(_early_signals[0]).name)
                stopping.set()
            outer.start_soon(give_up)
            async with trio.open_nursery() as workers:
                for index in range(settings.workers):
                    workers.start_soon(worker, index)
            outer.cancel_scope.cancel()
    sock.close()
    os.close(lifeline_read)
    os.close(lifeline_write)
    shutil.rmtree(peers_dir, ignore_errors=True)
    return 2 if refused else 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
