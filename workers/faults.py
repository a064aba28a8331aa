"""Which failures are transient (retry the batch, visibly) and which belong to a record (dead-letter it).

Kafka clients and redis-py already classify their errors: aiokafka marks each
error class ``retriable``; redis-py's connection, timeout and cluster-state
errors are the ones a later attempt can cure. Everything else (a bug, a value
the code did not expect, a record the broker refuses) is the record's fault.
"""

from __future__ import annotations

import redis.exceptions as redis_errors
from aiokafka.errors import KafkaError, KafkaTimeoutError, UnknownTopicOrPartitionError

TRANSIENT_REDIS = (
    redis_errors.ConnectionError,  # includes AuthenticationError: fixed by an operator, visible meanwhile
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.MasterDownError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
)


def is_transient(exc: BaseException) -> bool:
    """True when the same work may succeed later: servers unreachable, busy, or slow."""
    if isinstance(exc, TRANSIENT_REDIS):
        return True
    if isinstance(exc, UnknownTopicOrPartitionError):
        return False  # a topic a record named that does not exist: waiting will not create it
    if isinstance(exc, KafkaTimeoutError):
        return True  # not flagged retriable by aiokafka, but a broker that did not answer in time
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    return isinstance(exc, (ConnectionError, TimeoutError))
