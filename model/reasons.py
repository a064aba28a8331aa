"""A short, human reason for each recommended item, derived from the user's state."""

from __future__ import annotations

from collections.abc import Sequence

from rtrec.stream.state_store import UserState

VERB = {"browse": "browsed", "click": "clicked", "purchase": "bought"}
TRENDING = "trending now"
POPULAR = "popular pick"  # ranked without a link to the user: not even among the top trending items
TRENDING_SHOWN = 50  # items of the trending list a reason calls trending


def explain_all(state: UserState, item_ids: Sequence[str]) -> list[str]:
    """Why each item is shown: its link to the most recent thing the user did, else trending.

    The lookups are built once per user (not per item), so a response costs
    O(history + neighbours) however many items it carries.
    """
    latest_type: dict[str, str] = {}
    for entry in state.sequence:  # oldest -> newest: the last write wins
        latest_type[entry.item_id] = entry.type
    linked_to: dict[str, str] = {}  # neighbour -> the most recent history item it is co-visited with
    for entry in reversed(state.sequence):
        for other, _ in state.covis.get(entry.item_id) or ():
            linked_to.setdefault(other, entry.item_id)
    trending = trending_items(state)
    reasons = []
    for item in item_ids:
        anchor = linked_to.get(item)
        if anchor is not None:
            kind = latest_type[anchor]
            reasons.append(
                f"bought together with {anchor}" if kind == "purchase" else f"because you {VERB[kind]} {anchor}"
            )
        elif item in latest_type:
            reasons.append(f"you {VERB[latest_type[item]]} it recently")
        else:
            reasons.append(TRENDING if item in trending else POPULAR)
    return reasons


def explain(state: UserState, item_id: str) -> str:
    """The reason for one item (see explain_all)."""
    return explain_all(state, [item_id])[0]


def similar_reasons(state: UserState, anchor: str, row: Sequence[tuple[str, float]], by_model: bool) -> list[str]:
    """Why each item goes with the anchor: co-visited with it; else, when a model ranked, what the model
    ranks after it; else trending (the baseline's own signal, or a refill)."""
    covisited = {item for item, _ in state.covis.get(anchor) or ()}
    trending = trending_items(state)
    reasons = []
    for item, score in row:
        if item in covisited:
            reasons.append(f"often bought together with {anchor}")
        elif by_model and score > 0:
            reasons.append(f"similar to {anchor}")
        else:
            reasons.append(TRENDING if item in trending else POPULAR)
    return reasons


def trending_items(state: UserState) -> set[str]:
    """The items a reason may call trending."""
    return {item for item, _ in state.trending[:TRENDING_SHOWN]}
