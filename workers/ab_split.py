"""A/B split between model versions: which users the candidate serves, and loading it.

With ``RTREC_AB_CANDIDATE=<version>`` a recommend worker serves ``RTREC_AB_SHARE`` of users from
that named version (the "candidate" arm) and the rest from CURRENT (the "control" arm, which the
model watcher keeps hot-swapping). A user's arm is a hash of their user id (blake2b, never Python's
salted ``hash()``): the same user gets the same arm in every worker, after every restart. A
similar-items request without a user is always served by control: it has no user to keep sticky,
and the online quality join (which joins by user) could not credit its arm anyway.

The candidate is loaded and verified like a hot swap (the store's checkpoint, every file's sha256,
one warm-up batch). One that cannot be loaded is logged in one line, counted, marked in the metrics
(``rtrec_ab_candidate_loaded``) and in the recommend stats hash, and everyone is served by control:
a bad version name must not crash-loop the workers.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from prometheus_client import Gauge

from rtrec.stream.settings import Settings
from rtrec.workers.metrics import MODEL_REFUSED

if TYPE_CHECKING:  # the quality join imports the arms: it must not pay for torch
    from rtrec.model.recommender import GenerativeRecommender

log = logging.getLogger(__name__)
CONTROL = "control"
CANDIDATE = "candidate"
ARMS = (CONTROL, CANDIDATE)
_BUCKETS = 1 << 64

AB_CANDIDATE_LOADED = Gauge(
    "rtrec_ab_candidate_loaded", "1: the A/B candidate version serves its share; 0: it was refused", ["version"]
)


def arm_of(user_id: str, share: float) -> str:
    """The user's arm: "candidate" for a stable `share` of user ids, else "control" (and for no user)."""
    if not user_id or share <= 0:
        return CONTROL
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return CANDIDATE if int.from_bytes(digest, "big") < share * _BUCKETS else CONTROL


def load_candidate(settings: Settings) -> GenerativeRecommender:
    """RTREC_AB_CANDIDATE from the checkpoint store, verified and warmed up as a hot swap is (raises if refused).

    Always its own copy, even of CURRENT's version: the watcher may update control's vLLM engine in place.
    """
    from rtrec.model.loader import load_generator, warm_up
    from rtrec.model.store import CheckpointStore

    version = settings.ab_candidate
    if not version:
        raise ValueError("no RTREC_AB_CANDIDATE set")
    recommender = load_generator(settings, CheckpointStore(settings.checkpoint_dir).path_of(version))
    warm_up(recommender)
    return recommender


def candidate_or_none(settings: Settings) -> GenerativeRecommender | None:
    """The A/B candidate, or None: no split configured, or the version refused (said in one line, counted)."""
    version = settings.ab_candidate
    if not version:
        return None
    try:
        candidate = load_candidate(settings)
    except Exception as exc:  # noqa: BLE001 - missing, corrupt, wrong shape: serve everyone from CURRENT
        MODEL_REFUSED.inc()
        AB_CANDIDATE_LOADED.labels(version=version).set(0)
        log.error(
            "A/B candidate %s refused (%s: %s); serving every user from CURRENT",
            version,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
    AB_CANDIDATE_LOADED.labels(version=version).set(1)
    log.info("A/B split: %.0f%% of users served by candidate %s", settings.ab_share * 100, candidate.version)
    return candidate
