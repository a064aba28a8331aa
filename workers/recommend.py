"""Recommendation worker: request records -> `RankingPipeline` -> response records.

Run as ``python -m rtrec.workers.recommend``. Per batch it parses and validates the
requests (bad ones are dead-lettered and answered with an error) and reads the users'
states (the ranking pipeline's first stage, model/ranking.py); a ranker task then ranks
every batch read so far in one call (scoring, fusion, diversity, reasons — the same
object `rtrec eval` measures), publishes each batch's responses in order and counts them.
While the model ranks, the loop reads the next batches: neither waits for the other.
Responses are produced (and acked by the broker) before the request offsets are
committed, so a crash re-answers rather than drops. A batch whose ranking fails
(Redis down, a model error) answers every request in it with an error response, once:
the stats written afterwards are best-effort and never cause a re-publish. A request
whose reply topic is refused, missing or unsendable is dead-lettered and answered with
an error on the default response topic; it never holds the batch.

With an A/B split (RTREC_AB_CANDIDATE, workers/ab_split.py) each batch's requests are split by their
user's arm; each arm is read and ranked by its own `RankingPipeline` (one model per call, as without a
split) and the responses, each naming its arm and the version that made it, go out in request order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
import redis.exceptions
from aiokafka import AIOKafkaProducer, ConsumerRecord

from rtrec.model.loader import load_recommender
from rtrec.model.ranking import Ranking, RankingPipeline, RankQuery, ReadBatch
from rtrec.model.recommender import Recommender
from rtrec.stream.events import InvalidEvent
from rtrec.stream.keys import RECOMMEND_STATS
from rtrec.stream.rec_messages import RecRequest, RecResponse, best_effort_ids, parse_request
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import UserState
from rtrec.workers.ab_split import CANDIDATE, CONTROL, arm_of, candidate_or_none
from rtrec.workers.dead_letters import DeadLetter, DeadLetters
from rtrec.workers.faults import is_transient
from rtrec.workers.faust_app import run_module, worker_app
from rtrec.workers.lifecycle import consuming, serving, worker_producer, worker_redis
from rtrec.workers.metrics import BATCH_SIZE, FRESHNESS, REQUEST_LATENCY, REQUESTS, readiness, set_model
from rtrec.workers.model_watch import ModelWatcher
from rtrec.workers.reply_topics import ReplyTopics
from rtrec.workers.runtime import ConsumerRuntime

log = logging.getLogger(__name__)
FRESHNESS_USERS = 100_000  # users whose last reflected event the worker remembers
Answer = tuple[ConsumerRecord, RecResponse, str | None]  # a request record, its response, its reply topic


def now_ms() -> int:
    return int(time.time() * 1000)


class RecommendWorker:
    """Answers a batch of raw request records."""

    def __init__(
        self,
        settings: Settings,
        redis_client: Any,
        producer: AIOKafkaProducer,
        dead_letters: DeadLetters,
        recommender: Recommender,
        fallback: Recommender | None = None,
        candidate: Recommender | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.producer = producer
        self.dead_letters = dead_letters
        self.pipeline = RankingPipeline(settings, recommender, baseline=fallback)  # fallback: trending, unknown users
        # the A/B candidate arm: a fixed named version (never hot-swapped), the same baseline and filters
        self.candidate = None if candidate is None else RankingPipeline(settings, candidate, self.pipeline.baseline)
        self.reply_topics = ReplyTopics(producer)
        self._reflected: OrderedDict[str, int] = OrderedDict()  # user -> newest event ts already answered from
        self._queue: list[Queued] = []  # batches read, waiting for the model
        self._ranker: asyncio.Task | None = None  # ranks the queue while it is not empty
        self.answered = 0
        self.errors = 0
        self.batches = 0

    @property
    def recommender(self) -> Recommender:
        """The served model: the model watcher assigns a new one here, the pipeline ranks with it from the next call."""
        return self.pipeline.recommender

    @recommender.setter
    def recommender(self, recommender: Recommender) -> None:
        self.pipeline.recommender = recommender

    async def handle(self, records: Sequence[ConsumerRecord]) -> Awaitable[object]:
        """Parse the batch and read its users' states, and queue it for the ranker (`_rank_queued`).

        Returns the wait for its responses' acks (the loop commits after it): while queued
        batches are ranked, the loop fetches the next batches and reads their states.
        """
        valid: list[tuple[ConsumerRecord, RecRequest]] = []
        responses: list[Answer] = []
        bad: list[DeadLetter] = []
        for rec in records:
            try:
                valid.append((rec, parse_request(rec.value, self.settings)))
            except InvalidEvent as exc:
                bad.append(DeadLetter(rec, exc.reason, exc.detail))
                request_id, user_id = best_effort_ids(rec.value or b"", self.settings)
                responses.append((rec, self._error(request_id, user_id, f"invalid request: {exc}"), None))
        valid = await self._check_reply_topics(valid, responses, bad)
        read = await self._read(valid)
        await self.dead_letters.publish(bad)
        queued = Queued(read, responses, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        if self._ranker is None or self._ranker.done():
            self._ranker = asyncio.create_task(self._rank_queued())
        return self._acked_and_counted(queued)

    def arm_of(self, request: RecRequest) -> str:
        """The request's A/B arm: sticky per user; "control" without a candidate loaded."""
        return CONTROL if self.candidate is None else arm_of(request.user_id, self.settings.ab_share)

    def _pipeline(self, arm: str) -> RankingPipeline:
        return self.candidate if arm == CANDIDATE and self.candidate is not None else self.pipeline

    async def _read(self, valid: list[tuple[ConsumerRecord, RecRequest]]) -> list[Part]:
        """Stage one of the pipeline, per arm; a failure (Redis down) is kept: that part is answered with errors."""
        by_arm: dict[str, list[tuple[ConsumerRecord, RecRequest]]] = {}
        for pair in valid:
            by_arm.setdefault(self.arm_of(pair[1]), []).append(pair)
        starts = [self._pipeline(arm).start(self.redis, [query_of(r) for _, r in by_arm[arm]]) for arm in by_arm]
        reads = await asyncio.gather(*starts, return_exceptions=True)  # errors: answered in _answer_group, not dropped
        return [Part(arm, pairs, read) for (arm, pairs), read in zip(by_arm.items(), reads)]

    async def _rank_queued(self) -> None:
        """Rank whatever batches were read meanwhile as one model batch, publish them in order; repeat.

        One ranking at a time (concurrent forwards in threads only contend for the cores), and every
        batch read while the model was busy joins the next forward: a fixed cost per forward is paid
        once for all of them, however small the Kafka batches are.
        """
        taken: list[Queued] = []
        try:
            while self._queue:
                taken, self._queue = self._queue, []
                answers = await self._answer_all(taken)
                for queued, answered in zip(taken, answers):
                    try:
                        responses = sorted(queued.responses + answered, key=_request_order)
                        queued.published.set_result((await self._publish(responses), len(responses)))
                    except Exception as exc:  # noqa: BLE001 - the broker's fault: the runtime handles it again
                        queued.published.set_exception(exc)
        finally:  # a bug or a cancellation here must not leave a batch's commit waiting forever
            left, self._queue = [q for q in taken + self._queue if not q.published.done()], []
            for queued in left:
                queued.published.set_exception(RuntimeError("the ranking of this batch stopped; handling it again"))

    async def _acked_and_counted(self, queued: Queued) -> None:
        """After the batch is published: the broker's acks, and the stats (written while the acks come)."""
        acks, n = await queued.published
        self.batches += 1
        BATCH_SIZE.labels(worker="recommend").observe(n)
        await asyncio.gather(acks, self._count_batch(n))

    async def _check_reply_topics(
        self, valid: list[tuple[ConsumerRecord, RecRequest]], responses: list[Answer], bad: list[DeadLetter]
    ) -> list[tuple[ConsumerRecord, RecRequest]]:
        """Requests whose reply topic exists; the others are dead-lettered and answered on the default topic."""
        kept = []
        for rec, req in valid:
            if (
                req.reply_topic
                and req.reply_topic != self.settings.topic_responses
                and not await self.reply_topics.exists(req.reply_topic)
            ):
                detail = f"reply_topic {req.reply_topic!r} does not exist; create it first"
                bad.append(DeadLetter(rec, "reply_topic_missing", detail))
                responses.append((rec, self._error(req.request_id, req.user_id, f"invalid request: {detail}"), None))
            else:
                kept.append((rec, req))
        return kept

    async def _count_batch(self, requests: int) -> None:
        """Batch and request counts in Redis: best-effort, the responses are already out."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(RECOMMEND_STATS, "batches", 1)
            pipe.hincrby(RECOMMEND_STATS, "requests", requests)
            await pipe.execute()
        except redis.exceptions.RedisError as exc:
            log.warning("recommendation stats not written (%s: %s)", type(exc).__name__, exc)

    async def _answer_all(self, taken: list[Queued]) -> list[list[Answer]]:
        """Each queued batch's answers; the parts read for the same arm and model are ranked in one pipeline call."""
        groups: dict[tuple[str, int], list[Part]] = {}
        for part in (part for queued in taken for part in queued.parts):
            model = part.read.recommender if isinstance(part.read, ReadBatch) else part  # a failed read: on its own
            groups.setdefault((part.arm, id(model)), []).append(part)
        for (arm, _), group in groups.items():
            await self._answer_group(arm, group)
        return [[answer for part in queued.parts for answer in part.answers] for queued in taken]

    async def _answer_group(self, arm: str, group: list[Part]) -> None:
        """The arm pipeline's rankings as each part's responses; a failed group is answered with errors, never
        dropped."""
        valid = [pair for part in group for pair in part.valid]
        first = group[0].read
        try:
            if isinstance(first, BaseException):  # a failed read is a group of its own (`_answer_all`)
                raise first
            rankings = await self._pipeline(arm).finish(self.redis, _merged([part.read for part in group]))
        except Exception as exc:  # Redis down, a model error: the batch is answered with errors, never dropped
            log.exception("recommendation batch failed")
            error = f"{type(exc).__name__}: {exc}"
            version = first.recommender.version if isinstance(first, ReadBatch) else None
            answers = [
                (rec, self._error(req.request_id, req.user_id, error, arm, version), req.reply_topic)
                for rec, req in valid
            ]
        else:
            self._observe_freshness([ranking.state for ranking in rankings])
            answers = [(rec, self._response(req, r, arm), req.reply_topic) for (rec, req), r in zip(valid, rankings)]
        at = 0
        for part in group:
            part.answers = answers[at : at + len(part.valid)]
            at += len(part.valid)

    def _observe_freshness(self, states: Sequence[UserState]) -> None:
        """Event time of each user's newest event -> the first response computed from it."""
        now = now_ms()
        for st in states:
            if st.last_ts is None or self._reflected.get(st.user_id) == st.last_ts:
                continue
            FRESHNESS.observe(max(0.0, now - st.last_ts) / 1000)
            self._reflected[st.user_id] = st.last_ts
            self._reflected.move_to_end(st.user_id)
            if len(self._reflected) > FRESHNESS_USERS:
                self._reflected.popitem(last=False)

    def _response(self, req: RecRequest, ranking: Ranking, arm: str = CONTROL) -> RecResponse:
        """A ranking as the response to its request; never an empty answer without a reason."""
        if not ranking.items:
            error = "nothing to recommend: every candidate was seen or excluded, or no events have arrived yet"
            empty = self._error(req.request_id, req.user_id, error, arm, ranking.version)
            empty.fallback = ranking.fallback  # an unknown user was answered from (empty) trending
            return empty
        return RecResponse(
            request_id=req.request_id,
            user_id=req.user_id,
            items=ranking.items,
            model_version=ranking.version,
            fallback=ranking.fallback,
            item_id=req.item_id,
            arm=arm,
        )

    def _error(
        self, request_id: str, user_id: str, message: str, arm: str = CONTROL, version: str | None = None
    ) -> RecResponse:
        version = version or self._pipeline(arm).recommender.version
        return RecResponse(request_id, user_id, [], version, error=message, arm=arm)

    async def _publish(self, responses: list[Answer]) -> Awaitable[object]:
        """Send the responses in order; returns their acks to await (not awaited here: the next batch
        need not wait for them, only this batch's commit does)."""
        acks = []
        for rec, resp, reply_topic in responses:
            if not resp.request_id and resp.error:
                continue  # uncorrelatable garbage: the dead letter is its only trace
            resp.generated_at = now_ms()
            resp.latency_ms = float(resp.generated_at - rec.timestamp)
            if resp.error:
                self.errors += 1
            REQUESTS.labels(model_version=resp.model_version, outcome="error" if resp.error else "ok").inc()
            REQUEST_LATENCY.observe(max(0.0, resp.latency_ms) / 1000)
            topic = reply_topic or self.settings.topic_responses
            try:
                future = await self.producer.send(topic, key=resp.user_id.encode(), value=resp.to_json())
            except Exception as exc:
                if not self._reply_topic_at_fault(exc, topic):
                    raise
                acks.append(self._answer_elsewhere(rec, resp, topic, exc))
                continue
            acks.append(self._acked(future, rec, resp, topic))
        self.answered += len(acks)
        return asyncio.gather(*acks)

    async def _acked(self, future: Awaitable[object], rec: ConsumerRecord, resp: RecResponse, topic: str) -> None:
        """The broker's ack of one response; a reply topic that refuses it gets the answer elsewhere."""
        try:
            await future
        except Exception as exc:
            if not self._reply_topic_at_fault(exc, topic):
                raise  # the broker's fault: the batch is handled again
            await self._answer_elsewhere(rec, resp, topic, exc)

    def _reply_topic_at_fault(self, exc: BaseException, topic: str) -> bool:
        """A send failed for good on a request's own reply topic (not the broker, not the default topic)."""
        return not is_transient(exc) and topic != self.settings.topic_responses

    async def _answer_elsewhere(self, rec: ConsumerRecord, resp: RecResponse, topic: str, exc: BaseException) -> None:
        """Reply topic unsendable: dead-letter the request, send an error answer to the default topic."""
        detail = f"reply_topic {topic!r} refused the response ({type(exc).__name__}: {exc})"
        log.warning("%s", detail)
        await self.dead_letters.publish([DeadLetter(rec, "reply_unsendable", detail)])
        error = self._error(resp.request_id, resp.user_id, detail, resp.arm, resp.model_version)
        error.generated_at, error.latency_ms = resp.generated_at, resp.latency_ms
        await (
            await self.producer.send(self.settings.topic_responses, key=resp.user_id.encode(), value=error.to_json())
        )


@dataclass(slots=True)
class Part:
    """One arm's share of a batch: its requests, their states (or why they could not be read), then answers."""

    arm: str
    valid: list[tuple[ConsumerRecord, RecRequest]]
    read: ReadBatch | BaseException  # the states, or why they could not be read (answered with errors)
    answers: list[Answer] = field(default_factory=list)


@dataclass(slots=True)
class Queued:
    """A batch between its state read and its ranking: what the ranker needs, and where the result goes."""

    parts: list[Part]  # one per arm with requests in this batch
    responses: list[Answer]  # answers known before ranking (invalid requests, missing reply topics)
    published: asyncio.Future[tuple[Awaitable[object], int]]  # the broker's acks and the response count


def _request_order(answer: Answer) -> tuple[str, int, int]:
    rec = answer[0]
    return rec.topic, rec.partition, rec.offset


def _merged(reads: Sequence[ReadBatch | BaseException]) -> ReadBatch:
    batches = [r for r in reads if isinstance(r, ReadBatch)]
    queries = [q for b in batches for q in b.queries]
    states = [st for b in batches for st in b.states]
    return ReadBatch(queries, states, batches[0].recommender)


async def answer_requests(settings: Settings, recommender: Recommender | None = None) -> None:
    """Requests topic -> rankings -> responses, batch after batch, following model promotions, until stopped."""
    async with worker_redis(settings) as redis, worker_producer(settings, linger_ms=1) as producer:
        dead_letters = DeadLetters(settings, producer, redis)
        consumer = ConsumerRuntime(
            settings,
            [settings.topic_requests],
            settings.recommend_group,
            settings.rec_batch_max,
            settings.rec_batch_wait_ms,
            worker="recommend",
            dead_letters=dead_letters,
        )
        served = recommender or load_recommender(settings)
        candidate = await asyncio.to_thread(candidate_or_none, settings)  # None: no split, or refused (logged)
        worker = RecommendWorker(settings, redis, producer, dead_letters, served, candidate=candidate)
        await _note_split(redis, settings, candidate)
        watcher = ModelWatcher(settings, worker, redis, RECOMMEND_STATS)
        await watcher.start()
        try:
            async with consuming(consumer):  # stopping it stops the supervised model watch too
                set_model(worker.recommender.version)
                if settings.recommender != "blend":
                    consumer.supervise("model-watch", watcher.run)

                async def ready() -> dict[str, bool]:
                    return await readiness(consumer, redis, model=worker.recommender is not None)

                async with serving(settings, "recommend", redis, ready):
                    log.info("recommend worker answering %s as %s", settings.topic_requests, settings.recommend_group)
                    await consumer.run(worker.handle)
        finally:
            await watcher.stop()


async def _note_split(redis_client: Any, settings: Settings, candidate: Recommender | None) -> None:
    """The A/B split in the recommend stats (`rtrec status`, operators): the candidate, or why it is not served."""
    if not settings.ab_candidate:
        return
    state = f"serving {settings.ab_share:g} of users" if candidate is not None else "refused: everyone on CURRENT"
    try:
        await redis_client.hset(RECOMMEND_STATS, "ab_candidate", f"{settings.ab_candidate}: {state}")
    except redis.exceptions.RedisError as exc:
        log.warning("A/B split not noted in the stats (%s: %s)", type(exc).__name__, exc)


def build_app(settings: Settings | None = None, recommender: Recommender | None = None) -> faust.App:
    """The worker's Faust app (tests pass their own recommender)."""
    return worker_app("rtrec-recommend-app", functools.partial(answer_requests, recommender=recommender), settings)


def query_of(request: RecRequest) -> RankQuery:
    """What the ranking pipeline is asked for one request (the three forms and a filter)."""
    return RankQuery(
        request.user_id,
        request.k,
        request.exclude_seen,
        anchor=request.item_id,
        candidates=request.candidates,
        filter=request.filter,
    )


def main() -> None:
    run_module(build_app)


if __name__ == "__main__":
    main()
