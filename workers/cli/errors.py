"""The CLI's one error boundary: a user's mistake is one line on stderr, not a traceback.

Every `rtrec` command runs inside `BoundaryTyper.__call__`. Errors a user can fix (a missing
or malformed file, a bad setting, an unreachable broker or Redis, a wrong option) print one
line, ``rtrec: error: <what is wrong>; <what to do>``, and exit 2. Anything else (a bug)
prints one line naming the exception and exits 1. ``--debug`` (anywhere on the command line)
or ``RTREC_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer

try:  # Typer >= 0.2x vendors its own copy of Click: its exceptions are the ones raised
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older Typer uses Click itself
    from click import exceptions as click_exc  # type: ignore[no-redef]

USAGE = 2  # a mistake in the input, the settings or the environment: fix it and run again
FAILED = 1  # the command ran and failed (rejected events, an error response, a bug)

# What the boundary knows about the command being run, for hints (set by the CLI as it goes).
context: dict[str, Any] = {}


class UserError(Exception):
    """A problem the user can fix; the message is one line: what is wrong and what to do."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def debug_enabled() -> bool:
    return os.environ.get("RTREC_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _settings_error(exc: Any) -> str:
    """pydantic's ValidationError of Settings, in the environment's names: RTREC_PARTITIONS=abc: ..."""
    short = {
        "int_parsing": "not an integer",
        "float_parsing": "not a number",
        "bool_parsing": "not true/false",
        "int_from_float": "not an integer",
    }
    parts = []
    for err in exc.errors():
        name = "RTREC_" + "_".join(str(p) for p in err.get("loc", ())).upper()
        value = err.get("input")
        shown = f"={value}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        if "password" in name.lower():
            shown = "=***"
        msg = short.get(err.get("type", ""), err.get("msg", "invalid").removeprefix("Value error, "))
        parts.append(f"{name}{shown}: {msg[:1].lower()}{msg[1:]}")
    return "; ".join(parts) + " (fix or unset the environment variable)"


def _kafka_hint() -> str:
    stack = context.get("stack_file")
    where = (
        f"the addresses come from {stack}: is that `rtrec up` still running? start it again"
        if stack
        else "start the stack with `rtrec up` or check RTREC_KAFKA_BOOTSTRAP"
    )
    return f"{where} (gave up after RTREC_CONNECT_TIMEOUT_S)"


def _redis_hint() -> str:
    stack = context.get("stack_file")
    return (
        f"the addresses come from {stack}: is that `rtrec up` still running? start it again"
        if stack
        else "start the stack with `rtrec up` or check RTREC_REDIS_URL"
    )


def _kafka_errors() -> Any:
    """kafka.errors, or None without kafka-python (then no error is classed as Kafka's)."""
    try:
        import kafka.errors as kerr
    except ImportError:  # pragma: no cover - kafka-python is a dependency
        return None
    return kerr


def _redis_errors() -> Any:
    """redis.exceptions, or None without redis-py (then no error is classed as Redis's)."""
    try:
        import redis.exceptions as rex
    except ImportError:  # pragma: no cover
        return None
    return rex


def _is_settings_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    return isinstance(exc, ValidationError)


def _is_kafka_unreachable(exc: BaseException) -> bool:
    kerr = _kafka_errors()
    if kerr is None:
        return False
    names = ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError")  # not in every kafka-python
    return isinstance(exc, tuple(getattr(kerr, n) for n in names if hasattr(kerr, n)))


def _is_kafka_error(exc: BaseException) -> bool:
    kerr = _kafka_errors()
    return kerr is not None and isinstance(exc, kerr.KafkaError)


def _is_redis_unreachable(exc: BaseException) -> bool:
    rex = _redis_errors()
    return rex is not None and isinstance(exc, (rex.ConnectionError, rex.TimeoutError))


def _is_redis_auth_error(exc: BaseException) -> bool:
    rex = _redis_errors()
    return rex is not None and isinstance(exc, rex.AuthenticationError)


def _is_not_configured(exc: BaseException) -> bool:
    from rtrec.stream.connections import NotConfigured

    return isinstance(exc, NotConfigured)


def _is_event_file_error(exc: BaseException) -> bool:
    from rtrec.stream.eventfile import EventFileError

    return isinstance(exc, EventFileError)


def _is_missing_dataset(exc: BaseException) -> bool:
    from rtrec.model.datasets import DatasetNotInstalled

    return isinstance(exc, DatasetNotInstalled)


def _is_invalid_event(exc: BaseException) -> bool:
    from rtrec.stream.events import InvalidEvent

    return isinstance(exc, InvalidEvent)


def _of(*types: type[BaseException]) -> Callable[[BaseException], bool]:
    return lambda exc: isinstance(exc, types)


def _named(*names: str) -> Callable[[BaseException], bool]:
    """Matched by class name, so the CLI need not import the module that raises it."""
    return lambda exc: type(exc).__name__ in names


_PATH_ERRORS: dict[type[BaseException], str] = {
    FileNotFoundError: "no such file",
    IsADirectoryError: "is a folder, not a file",
    NotADirectoryError: "not a folder",
    PermissionError: "permission denied",
}


def _path_error(exc: Any) -> str:
    name = exc.filename if getattr(exc, "filename", None) else None
    what = _PATH_ERRORS.get(type(exc))
    text = f"{name}: {what}" if name and what else _one_line(str(exc))
    return f"{text}; check the path"


def _reason(exc: BaseException) -> str:
    return _one_line(str(exc)) or type(exc).__name__


# (does it match, its line), the first match wins: every one is a mistake to fix (exit USAGE). The
# client libraries' and rtrec's own exception classes are imported only when an error reaches them.
_USER_ERRORS: list[tuple[Callable[[BaseException], bool], Callable[[Any], str]]] = [
    (_is_settings_error, _settings_error),
    (_is_kafka_unreachable, lambda exc: f"cannot reach the Kafka broker ({_reason(exc)}); {_kafka_hint()}"),
    (_is_kafka_error, lambda exc: f"Kafka error: {_reason(exc)}"),
    (  # before "unreachable": redis-py's AuthenticationError is a ConnectionError
        _is_redis_auth_error,
        lambda exc: (
            f"Redis refused the credentials ({_one_line(str(exc))}); "
            "check RTREC_REDIS_URL and RTREC_REDIS_PASSWORD / RTREC_REDIS_USERNAME"
        ),
    ),
    (_is_redis_unreachable, lambda exc: f"cannot reach Redis ({_one_line(str(exc))}); {_redis_hint()}"),
    (_is_not_configured, str),
    (_is_event_file_error, lambda exc: f"{_one_line(str(exc))}; fix the file and run again"),
    (_is_invalid_event, lambda exc: f"invalid event: {_one_line(str(exc))}"),
    (_is_missing_dataset, lambda exc: _one_line(str(exc))),  # says what to install: not a path to check
    (_of(*_PATH_ERRORS), _path_error),
    (
        _of(gzip.BadGzipFile),
        lambda exc: f"not a gzip file ({_one_line(str(exc))}); drop the .gz suffix or gzip the file",
    ),
    (_of(json.JSONDecodeError), lambda exc: f"not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"),
    (_of(UnicodeDecodeError), lambda exc: f"not UTF-8 text (byte {exc.start}); save the file as UTF-8"),
    (
        _named("LagError", "RebuildError", "TopicReadError", "DeliveryError", "ServerStartError", "TrainingInputError"),
        lambda exc: _one_line(str(exc)),
    ),
    (_of(ConnectionError, TimeoutError), lambda exc: f"{_reason(exc)}; is the stack running (`rtrec up`)?"),
]


def describe(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an error a user can act on; None for anything else."""
    if isinstance(exc, UserError):
        return str(exc), exc.code
    for matches, line in _USER_ERRORS:
        if matches(exc):
            return line(exc), USAGE
    return None


def report(exc: BaseException) -> int:
    """Print the one line for `exc` on stderr; return the exit code."""
    known = describe(exc)
    if known is None:
        text, code = (
            (
                f"{type(exc).__name__}: {_one_line(str(exc))} (an unexpected error; run with --debug or "
                f"RTREC_DEBUG=1 for the traceback)"
            ),
            FAILED,
        )
    else:
        text, code = known
    print(f"rtrec: error: {_one_line(text)}", file=sys.stderr, flush=True)
    return code


def _usage_line(exc: click_exc.UsageError) -> str:
    ctx = exc.ctx
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"rtrec: error: {_one_line(exc.format_message())}{where}"


class BoundaryTyper(typer.Typer):
    """A Typer app whose every command runs inside the error boundary."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        argv: Sequence[str] = kwargs.pop("args", None) or (args[0] if args else sys.argv[1:])
        args = args[1:] if args else ()
        argv = list(argv)
        cut = argv.index("--") if "--" in argv else len(argv)
        if "--debug" in argv[:cut]:
            argv.remove("--debug")
            os.environ["RTREC_DEBUG"] = "1"  # for child processes too
        if debug_enabled():
            return super().__call__(*args, args=argv, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            rv = super().__call__(*args, args=argv, **kwargs)
        except click_exc.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click_exc.UsageError as exc:
            print(_usage_line(exc), file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        except click_exc.ClickException as exc:
            print(f"rtrec: error: {_one_line(exc.format_message())}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("rtrec: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except KeyboardInterrupt:
            print("rtrec: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            sys.exit(report(exc))
        sys.exit(rv if isinstance(rv, int) else 0)
