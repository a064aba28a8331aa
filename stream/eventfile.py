"""Reading and writing event files (JSON lines or CSV, optionally gzipped).

The format follows the file name: ``.jsonl``, ``.json`` and ``.ndjson`` hold one JSON object
per line; ``.csv`` has a header row; a trailing ``.gz`` means gzip. Reading only parses: it
does not check that events make sense (``stream.events`` does that), but a line that cannot
be parsed raises ``ValueError`` naming the file and line, so bad input is easy to find.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_COLUMNS = ("event_id", "user_id", "item_id", "type", "ts", "session_id", "price", "quantity", "context")
CSV_REQUIRED = ("user_id", "item_id", "type", "ts")

OnError = Callable[[int, str], None]  # (line number, what is wrong) for a line that is skipped


class EventFileError(ValueError):
    """An event file that cannot be read: the message names the file (and line) and what is wrong."""


def file_format(path: Path) -> tuple[str, bool]:
    """('json' | 'csv', gzipped?) from the file name, or ValueError for anything else."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[: -len(".gz")]
    if name.endswith(JSON_SUFFIXES):
        return "json", gz
    if name.endswith(".csv"):
        return "csv", gz
    raise EventFileError(f"{path}: unknown event file format; use .jsonl, .json, .ndjson or .csv, optionally + .gz")


def open_text(path: Path, gz: bool, write: bool) -> IO[str]:
    """Text handle; newline='' leaves line endings to the csv module and json lines alike."""
    if not gz:
        return open(path, "w" if write else "r", encoding="utf-8" if write else "utf-8-sig", newline="")
    if write:  # mtime=0: the same events always give byte-identical files
        return io.TextIOWrapper(gzip.GzipFile(path, "wb", mtime=0), encoding="utf-8", newline="")
    return gzip.open(path, "rt", encoding="utf-8-sig", newline="")


def read_events(path: str | Path, on_error: OnError | None = None) -> Iterator[dict[str, Any]]:
    """Yield the event dicts in a file, lazily, in file order (the format is checked at once).

    A line that cannot be parsed raises EventFileError, or, with `on_error`, is reported to it
    (line number, message) and skipped. A missing file, a bad header, a file that is not gzip or
    not UTF-8 always raise (FileNotFoundError / EventFileError).
    """
    return (event for _, event in read_numbered_events(path, on_error))


def read_numbered_events(path: str | Path, on_error: OnError | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, event) pairs, else as read_events; the line is where the event ends."""
    path = Path(path)
    kind, gz = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _guarded(path, _read_json(path, gz, on_error) if kind == "json" else _read_csv(path, gz, on_error))


def _guarded(path: Path, events: Iterator[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Decoding failures of the whole file as EventFileError naming the file."""
    try:
        yield from events
    except gzip.BadGzipFile:
        raise EventFileError(f"{path}: not a gzip file (drop the .gz suffix or gzip it)") from None
    except EOFError:
        raise EventFileError(f"{path}: the gzip stream ends early (a truncated file)") from None
    except UnicodeDecodeError as exc:
        raise EventFileError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except csv.Error as exc:
        raise EventFileError(f"{path}: not readable as CSV ({exc})") from None


def _bad(on_error: OnError | None, path: Path, lineno: int, message: str) -> None:
    if on_error is None:
        raise EventFileError(f"{path}:{lineno}: {message}")
    on_error(lineno, message)


def _read_json(path: Path, gz: bool, on_error: OnError | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    with open_text(path, gz, write=False) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                _bad(on_error, path, lineno, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                _bad(on_error, path, lineno, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def _to_int(text: str) -> int:
    """Integers, also as written by tools that turn integer columns into floats ('3.0')."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise ValueError(f"{text!r} is not an integer") from None
        return int(value)


_CONVERT: dict[str, Callable[[str], Any]] = {"ts": _to_int, "quantity": _to_int, "price": float, "context": json.loads}


def _read_csv(path: Path, gz: bool, on_error: OnError | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    with open_text(path, gz, write=False) as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            return  # an empty file holds no events
        missing = [name for name in CSV_REQUIRED if name not in header]
        if missing:
            raise EventFileError(
                f"{path}:1: missing required column(s): {', '.join(missing)} "
                f"(the header must name {', '.join(CSV_REQUIRED)}; optional: event_id, ...)"
            )
        if len(set(header)) != len(header):
            raise EventFileError(f"{path}:1: duplicate column names in header")
        for row in reader:
            if not any(cell.strip() for cell in row):  # blank line
                continue
            lineno = reader.line_num  # physical line where the row ends (quoted cells may span lines)
            if len(row) != len(header):
                _bad(on_error, path, lineno, f"expected {len(header)} columns, got {len(row)}")
                continue
            event: dict[str, Any] = {}
            for name, cell in zip(header, row):
                if cell == "":
                    continue
                convert = _CONVERT.get(name)
                try:
                    event[name] = convert(cell) if convert else cell
                except ValueError as exc:  # json.JSONDecodeError is a ValueError too
                    _bad(on_error, path, lineno, f"bad {name} value {cell[:40]!r} ({exc})")
                    break
            else:
                yield lineno, event


def count_records(path: str | Path) -> int:
    """About how many events a file holds, cheaply: its non-blank lines (less the CSV header).

    Reads raw bytes line by line, never parses (a plain file counts at hundreds of MB/s; a .gz is
    decompressed once), so it is a total for progress bars, not a validation. A CSV field with a
    quoted newline counts as two.
    """
    path = Path(path)
    kind, gz = file_format(path)
    with gzip.open(path, "rb") if gz else open(path, "rb", buffering=1 << 20) as handle:
        lines = sum(1 for line in handle if not line.isspace())
    return max(0, lines - 1) if kind == "csv" else lines


def write_events(path: str | Path, events: Iterable[dict[str, Any]]) -> int:
    """Write events in the format the file name asks for; returns how many were written."""
    path = Path(path)
    kind, gz = file_format(path)
    count = 0
    with open_text(path, gz, write=True) as f:
        if kind == "json":
            for event in events:
                f.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
                count += 1
            return count
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for event in events:
            writer.writerow(_csv_row(path, event, count + 1))
            count += 1
    return count


def _csv_row(path: Path, event: dict[str, Any], n: int) -> list[str]:
    """One CSV row; refuses fields the columns cannot hold rather than dropping them silently."""
    extra = set(event) - set(CSV_COLUMNS)
    if extra:
        fields = ", ".join(sorted(extra))
        raise ValueError(f"{path}: event {n} has field(s) a CSV event file cannot hold: {fields}")
    row = []
    for name in CSV_COLUMNS:
        value = event.get(name)
        if value is None:
            row.append("")
        elif name == "context":
            row.append(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
        else:
            row.append(str(value))
    return row
