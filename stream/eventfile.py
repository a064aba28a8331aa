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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_COLUMNS = ("event_id", "user_id", "item_id", "type", "ts", "session_id", "price", "quantity", "context")
CSV_REQUIRED = ("user_id", "item_id", "type", "ts")


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
    raise ValueError(
        f"{path}: unknown event file format; use .jsonl, .json, .ndjson or .csv, optionally + .gz"
    )


def open_text(path: Path, gz: bool, write: bool) -> IO[str]:
    """Text handle; newline='' leaves line endings to the csv module and json lines alike."""
    if not gz:
        return open(path, "w" if write else "r", encoding="utf-8" if write else "utf-8-sig", newline="")
    if write:  # mtime=0: the same events always give byte-identical files
        return io.TextIOWrapper(gzip.GzipFile(path, "wb", mtime=0), encoding="utf-8", newline="")
    return gzip.open(path, "rt", encoding="utf-8-sig", newline="")


def read_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the event dicts in a file, lazily, in file order (the format is checked at once)."""
    path = Path(path)
    kind, gz = file_format(path)
    return _read_json(path, gz) if kind == "json" else _read_csv(path, gz)


def _read_json(path: Path, gz: bool) -> Iterator[dict[str, Any]]:
    with open_text(path, gz, write=False) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def _to_int(text: str) -> int:
    """Integers, also as written by tools that turn integer columns into floats ('3.0')."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise ValueError(f"{text!r} is not an integer") from None
        return int(value)


_CONVERT = {"ts": _to_int, "quantity": _to_int, "price": float, "context": json.loads}


def _read_csv(path: Path, gz: bool) -> Iterator[dict[str, Any]]:
    with open_text(path, gz, write=False) as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            return  # an empty file holds no events
        missing = [name for name in CSV_REQUIRED if name not in header]
        if missing:
            raise ValueError(f"{path}:1: missing required column(s): {', '.join(missing)}")
        if len(set(header)) != len(header):
            raise ValueError(f"{path}:1: duplicate column names in header")
        for row in reader:
            if not any(cell.strip() for cell in row):  # blank line
                continue
            lineno = reader.line_num  # physical line where the row ends (quoted cells may span lines)
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
            event: dict[str, Any] = {}
            for name, cell in zip(header, row):
                if cell == "":
                    continue
                convert = _CONVERT.get(name)
                try:
                    event[name] = convert(cell) if convert else cell
                except ValueError as exc:  # json.JSONDecodeError is a ValueError too
                    raise ValueError(f"{path}:{lineno}: bad {name} value {cell[:40]!r} ({exc})") from None
            yield event


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
