"""A short, human reason for each recommended item, derived from the user's state."""

from __future__ import annotations

from stream.state_store import UserState

VERB = {"browse": "browsed", "click": "clicked", "purchase": "bought"}


def explain(state: UserState, item_id: str) -> str:
    """Why `item_id` is shown: its strongest link to what the user did, else trending."""
    latest_type = {}
    for entry in state.sequence:  # oldest -> newest: the last write wins
        latest_type[entry.item_id] = entry.type
    for entry in reversed(state.sequence):
        neighbours = state.covis.get(entry.item_id)
        if neighbours and any(other == item_id for other, _ in neighbours):
            if latest_type.get(entry.item_id) == "purchase":
                return f"bought together with {entry.item_id}"
            return f"because you {VERB[latest_type[entry.item_id]]} {entry.item_id}"
    if item_id in latest_type:
        return f"you {VERB[latest_type[item_id]]} it recently"
    if any(other == item_id for other, _ in state.trending[:50]):
        return "trending now"
    return "popular pick"
