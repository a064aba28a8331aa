"""User histories built from event dicts: the one place training, fine-tuning and stream eval get them.

A history is a user's ``(item_id, event type)`` pairs, oldest first (`tokens.History`).
Events are taken in the order given: callers pass time-ordered events, and events with
the same timestamp keep their order in the input. Nothing is weighted, merged or
de-duplicated here — every event is one step, whatever its type. A cap keeps the
newest steps, as the model only ever reads the last `max_events`.

>>> events = [{"user_id": 1, "item_id": "a", "type": "view"},
...           {"user_id": 2, "item_id": "b", "type": "click"},
...           {"user_id": 1, "item_id": "c", "type": "purchase"}]
>>> user_histories(events)
{'1': [('a', 'view'), ('c', 'purchase')], '2': [('b', 'click')]}
>>> histories = user_histories(events[:1])
>>> extend_histories(histories, events[1:])
>>> histories == user_histories(events)
True
>>> newest([("a", "view"), ("b", "view"), ("c", "view")], 2)
[('b', 'view'), ('c', 'view')]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Step = tuple[str, str]  # (item_id, event type)


def event_step(event: dict[str, Any]) -> Step:
    """The history step one event dict contributes."""
    return str(event["item_id"]), str(event["type"])


def extend_histories(histories: dict[str, list[Step]], events: Iterable[dict[str, Any]]) -> None:
    """Append each event to its user's history, in the order given (in place)."""
    for e in events:
        histories.setdefault(str(e["user_id"]), []).append(event_step(e))


def user_histories(events: Iterable[dict[str, Any]]) -> dict[str, list[Step]]:
    """Each user's (item, type) steps in the order given (callers pass time-ordered events)."""
    out: dict[str, list[Step]] = {}
    extend_histories(out, events)
    return out


def newest(history: Sequence[Step], max_events: int) -> list[Step]:
    """The last `max_events` steps of a history (the whole history when it is shorter)."""
    return list(history[-max_events:])
