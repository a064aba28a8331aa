"""Event files must round-trip in every format and point at the exact line when input is bad."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from rtrec.stream.eventfile import count_records, read_events, write_events
from rtrec.stream.synthetic import SyntheticConfig, generate_events

EVENTS = [
    {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "browse", "ts": 1_767_225_600_000},
    {
        "event_id": "e2",
        "user_id": "u1",
        "item_id": "i1",
        "type": "click",
        "ts": 1_767_225_601_000,
        "session_id": "s1",
        "context": {"device": "mobile", "page": 'home, "top"', "pos": 3},
    },
    {
        "event_id": "e3",
        "user_id": "u2",
        "item_id": "i9",
        "type": "purchase",
        "ts": 1_767_225_602_000,
        "session_id": "s1",
        "price": 19.99,
        "quantity": 2,
        "context": {"note": "multi\nline, ünïcode"},
    },
]


@pytest.mark.parametrize(
    "name", ["ev.jsonl", "ev.json", "ev.ndjson", "ev.csv", "ev.jsonl.gz", "ev.csv.gz", "EV.CSV.GZ"]
)
def test_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert write_events(path, iter(EVENTS)) == len(EVENTS)
    assert list(read_events(path)) == EVENTS
    assert list(read_events(str(path))) == EVENTS  # str paths work too


@pytest.mark.parametrize("name", ["syn.jsonl.gz", "syn.csv"])
def test_round_trip_synthetic(tmp_path: Path, name: str) -> None:
    events = generate_events(SyntheticConfig(n_events=2000))
    path = tmp_path / name
    assert write_events(path, events) == 2000
    assert list(read_events(path)) == events


def test_gz_files_are_really_gzipped_and_reproducible(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    a, b = tmp_path / "ev.jsonl.gz", tmp_path / "x" / "ev.jsonl.gz"
    write_events(a, EVENTS)
    write_events(b, EVENTS)
    assert a.read_bytes()[:2] == b"\x1f\x8b"
    assert a.read_bytes() == b.read_bytes()  # no timestamp in the gzip header
    assert gzip.decompress(a.read_bytes()).decode().count("\n") == len(EVENTS)


def test_csv_layout(tmp_path: Path) -> None:
    path = tmp_path / "ev.csv"
    write_events(path, EVENTS[:1])
    lines = path.read_text().splitlines()
    assert lines[0] == "event_id,user_id,item_id,type,ts,session_id,price,quantity,context"
    assert lines[1] == "e1,u1,i1,browse,1767225600000,,,,"


def test_write_empty(tmp_path: Path) -> None:
    assert write_events(tmp_path / "e.jsonl", []) == 0
    assert write_events(tmp_path / "e.csv", []) == 0
    assert list(read_events(tmp_path / "e.jsonl")) == []
    assert list(read_events(tmp_path / "e.csv")) == []
    (tmp_path / "blank.csv").write_text("")
    assert list(read_events(tmp_path / "blank.csv")) == []


def test_jsonl_skips_blank_lines_and_does_not_validate(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    path.write_text('\n{"user_id": "u1", "type": "nonsense"}\r\n   \n{"anything": [1, 2]}\n\n')
    assert list(read_events(path)) == [{"user_id": "u1", "type": "nonsense"}, {"anything": [1, 2]}]


def test_csv_reading_converts_and_omits_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "ev.csv"
    path.write_text(
        "\ufeffuser_id,item_id,type,ts,price,quantity,context,extra\n"
        'u1,i1,purchase,1767225600000,5,2.0,"{""a"": 1}",x\n'
        "\n"
        "u2,i2,browse,1767225600001,,,,\n"
    )
    assert list(read_events(path)) == [
        {
            "user_id": "u1",
            "item_id": "i1",
            "type": "purchase",
            "ts": 1767225600000,
            "price": 5.0,
            "quantity": 2,
            "context": {"a": 1},
            "extra": "x",
        },
        {"user_id": "u2", "item_id": "i2", "type": "browse", "ts": 1767225600001},
    ]  # no event_id is invented


def test_reading_is_lazy_and_format_checked_up_front(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    path.write_text('{"a": 1}\nnot json\n')
    it = read_events(path)
    assert next(it) == {"a": 1}  # the bad line has not been reached yet
    with pytest.raises(ValueError):
        next(it)
    with pytest.raises(ValueError, match=r"ev\.txt: unknown event file format"):
        read_events(tmp_path / "ev.txt")
    with pytest.raises(ValueError, match="unknown event file format"):
        write_events(tmp_path / "ev.parquet", EVENTS)


@pytest.mark.parametrize(
    ("text", "lineno", "message"),
    [
        ('{"a": 1}\n\n{"a": 2\n', 3, "not valid JSON"),
        ('{"a": 1}\n[1, 2]\n', 2, "expected a JSON object, got list"),
        ('"just a string"\n', 1, "expected a JSON object, got str"),
    ],
)
def test_json_errors_name_file_and_line(tmp_path: Path, text: str, lineno: int, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{lineno}: {message}"):
        list(read_events(path))


def test_gz_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.ndjson.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n42\n'))
    with pytest.raises(ValueError, match=r"bad\.ndjson\.gz:3: expected a JSON object"):
        list(read_events(path))


@pytest.mark.parametrize(
    ("text", "lineno", "message"),
    [
        ("user_id,item_id,type,ts\nu1,i1,browse,1\nu1,i1,browse\n", 3, "expected 4 columns, got 3"),
        ("user_id,item_id,type,ts\nu1,i1,browse,1,extra\n", 2, "expected 4 columns, got 5"),
        # a quoted cell spanning lines: the error names the line where the bad row ends
        ('user_id,item_id,type,ts\n"u\n1",i1,browse,1\nu2,i2\n', 4, "expected 4 columns, got 2"),
        ("user_id,item_id,type,ts\nu1,i1,browse,soon\n", 2, "bad ts value 'soon'"),
        ("user_id,item_id,type,ts,quantity\nu1,i1,browse,1,1.5\n", 2, "bad quantity value '1.5'"),
        ("user_id,item_id,type,ts,context\nu1,i1,browse,1,{oops\n", 2, "bad context value"),
        ("user_id,item_id,kind,ts\nu1,i1,browse,1\n", 1, "missing required column\\(s\\): type"),
        ("user_id,item_id,type,ts,ts\nu1,i1,browse,1,2\n", 1, "duplicate column"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, text: str, lineno: int, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"bad\.csv:{lineno}: {message}"):
        list(read_events(path))


def test_csv_write_refuses_fields_it_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"event 2 has field\(s\) a CSV event file cannot hold: score"):
        write_events(tmp_path / "ev.csv", [EVENTS[0], {**EVENTS[0], "score": 1.0}])


@pytest.mark.parametrize("name", ["e.jsonl", "e.csv", "e.jsonl.gz", "e.csv.gz"])
def test_count_records_is_the_replay_total(tmp_path: Path, name: str) -> None:
    events = generate_events(SyntheticConfig(n_users=5, n_items=20, n_clusters=3, n_events=137, seed=1))
    write_events(tmp_path / name, events)
    assert count_records(tmp_path / name) == len(events) == len(list(read_events(tmp_path / name)))


def test_count_records_skips_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text('{"a": 1}\n\n{"a": 2}\r\n  \n{"a": 3}')
    assert count_records(tmp_path / "e.jsonl") == 3
    (tmp_path / "empty.csv").write_text("")
    assert count_records(tmp_path / "empty.csv") == 0


def test_replay_progress_shows_total_eta_and_rate(capsys) -> None:
    from rtrec.stream.replay import replay_events

    class Producer:
        def send(self, event):
            pass

        def flush(self):
            pass

    events = [{"user_id": "u", "item_id": str(n), "type": "click", "ts": n} for n in range(50)]
    replay_events(Producer(), events, total=50, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "50/50" in bar and "<" in bar and "ev/s" in bar, bar  # [elapsed<remaining, rate]
