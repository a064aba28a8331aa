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
from collections.abc import Sequence
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


def describe(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an error a user can act on; None for anything else."""
    from pydantic import ValidationError

    if isinstance(exc, UserError):
        return str(exc), exc.code
    if isinstance(exc, ValidationError):
        return _settings_error(exc), USAGE
    try:
        import kafka.errors as kerr

        unreachable = tuple(
            getattr(kerr, n)
            for n in ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError")
            if hasattr(kerr, n)
        )
        KafkaError = kerr.KafkaError
        if isinstance(exc, unreachable):
            reason = _one_line(str(exc)) or type(exc).__name__
            return f"cannot reach the Kafka broker ({reason}); {_kafka_hint()}", USAGE
        if isinstance(exc, KafkaError):
            return f"Kafka error: {_one_line(str(exc)) or type(exc).__name__}", USAGE
    except ImportError:  # pragma: no cover - kafka-python is a dependency
        pass
    try:
        import redis.exceptions as rex

        if isinstance(exc, (rex.ConnectionError, rex.TimeoutError)):
            return f"cannot reach Redis ({_one_line(str(exc))}); {_redis_hint()}", USAGE
        if isinstance(exc, rex.AuthenticationError):
            return f"Redis refused the credentials ({_one_line(str(exc))}); check RTREC_REDIS_URL", USAGE
    except ImportError:  # pragma: no cover
        pass
    from rtrec.stream.connections import NotConfigured
    from rtrec.stream.eventfile import EventFileError
    from rtrec.stream.events import InvalidEvent

    if isinstance(exc, NotConfigured):
        return str(exc), USAGE
    if isinstance(exc, EventFileError):
        return f"{_one_line(str(exc))}; fix the file and run again", USAGE
    if isinstance(exc, InvalidEvent):
        return f"invalid event: {_one_line(str(exc))}", USAGE
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        name = exc.filename if getattr(exc, "filename", None) else None
        what = {
            FileNotFoundError: "no such file",
            IsADirectoryError: "is a folder, not a file",
            NotADirectoryError: "not a folder",
            PermissionError: "permission denied",
        }.get(type(exc))
        text = f"{name}: {what}" if name and what else _one_line(str(exc))
        return f"{text}; check the path", USAGE
    if isinstance(exc, gzip.BadGzipFile):
        return f"not a gzip file ({_one_line(str(exc))}); drop the .gz suffix or gzip the file", USAGE
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})", USAGE
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start}); save the file as UTF-8", USAGE
    names = {type(exc).__name__}
    if names & {
        "LagError",
        "RebuildError",
        "TopicReadError",
        "DeliveryError",
        "ServerStartError",
        "TrainingInputError",
    }:
        return _one_line(str(exc)), USAGE
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"{_one_line(str(exc)) or type(exc).__name__}; is the stack running (`rtrec up`)?", USAGE
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
