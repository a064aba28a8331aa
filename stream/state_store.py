"""User state in Redis: the one place that knows the key layout and the update rules.

Writes go through one Lua script per chunk of events so that an event's
dedupe marker and every update it causes commit together: a redelivered
event (same event_id) finds its marker and changes nothing. Chunks are
pipelined, so a batch of thousands of events costs one network round-trip.

Key layout (``{u}`` is a validated user id, ``{i}`` an item id)::

    rt:dedupe:{event_id}   marker with TTL (idempotence)
    rt:u:{u}:h             hash: browse/click/purchase/n counts, first_ts, last_ts, aff_L
    rt:u:{u}:seq           zset: "item|type|event_id" scored by ts*1000 + arrival number mod 1000
                           (capped; ordered by event time, equal times in arrival order)
    rt:u:{u}:aff           zset: item -> forward-decayed affinity (landmark aff_L)
    rt:u:{u}:bought        zset: purchased item -> latest purchase ts (capped)
    rt:covis:{i}           zset: co-visited item -> count
    rt:pop                 zset: item -> forward-decayed popularity (landmark rt:pop:L)
    rt:items:n             zset: item -> raw event count
    rt:stats               hash: applied / duplicates

Time decay uses *forward decay*: an event of weight w at time t adds
w * 2^((t - L)/half_life) for a landmark L. Sums are then independent of the
order events arrive in (out-of-order events land exactly where they belong),
and ranking needs no per-read decay because every score shares the factor
2^(-(now - L)/half_life). When exponents grow large the whole set is rescaled
and L moves forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import redis

from stream.events import Event
from stream.settings import Settings

PREFIX = "rt"
BOUGHT_CAP = 500
RESCALE_AFTER_HALF_LIVES = 60.0
TIE_SLOTS = 1000  # sequence score = ts * 1000 + arrival number: equal timestamps keep arrival order

APPLY_LUA = r"""
local seq_len = tonumber(ARGV[1])
local fanout = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local aff_hl = tonumber(ARGV[4])
local pop_hl = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local weights = {browse = tonumber(ARGV[7]), click = tonumber(ARGV[8]), purchase = tonumber(ARGV[9])}
local rescale_after = tonumber(ARGV[10])
local bought_cap = tonumber(ARGV[11])
local P = ARGV[12]
local TIE = tonumber(ARGV[13])
local FIRST = 14
local n = (#ARGV - FIRST + 1) / 5
local flags = {}
local applied, dups = 0, 0

local function fmt(x) return string.format('%.17g', x) end

-- add w*2^((t-L)/hl) to member of zset (the caller moved L forward first if t is far ahead)
local function decayed_add(zkey, member, w, t, hl, L)
  redis.call('ZINCRBY', zkey, fmt(w * math.pow(2, (t - L) / hl)), member)
end

local function rescale(zkey, factor)
  redis.call('ZUNIONSTORE', zkey, 1, zkey, 'WEIGHTS', fmt(factor))
end

local pop_key = P .. ':pop'
local pop_L_key = P .. ':pop:L'

for i = 0, n - 1 do
  local b = FIRST + i * 5
  local eid, uid, item, etype, ts = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], tonumber(ARGV[b + 4])
  if redis.call('SET', P .. ':dedupe:' .. eid, '1', 'NX', 'EX', ttl) then
    applied = applied + 1
    flags[#flags + 1] = 1
    local u = P .. ':u:' .. uid
    local h, seq, aff = u .. ':h', u .. ':seq', u .. ':aff'
    local w = weights[etype]

    -- co-visitation with the user's events near this one in time (bounded fan-out)
    if fanout > 0 then
      local near = redis.call('ZREVRANGEBYSCORE', seq, (ts + window) * TIE + TIE - 1, (ts - window) * TIE,
                              'LIMIT', 0, fanout * 3)
      local seen, k = {}, 0
      for _, m in ipairs(near) do
        local other = string.match(m, '^([^|]+)|')
        if other ~= item and not seen[other] then
          seen[other] = true
          k = k + 1
          redis.call('ZINCRBY', P .. ':covis:' .. item, 1, other)
          redis.call('ZINCRBY', P .. ':covis:' .. other, 1, item)
          if k >= fanout then break end
        end
      end
    end

    -- counts first: the user's event number breaks ties between equal timestamps
    redis.call('HINCRBY', h, etype, 1)
    local nth = redis.call('HINCRBY', h, 'n', 1)

    -- recent sequence, ordered by event time then arrival, capped
    redis.call('ZADD', seq, ts * TIE + (nth % TIE), item .. '|' .. etype .. '|' .. eid)
    if redis.call('ZCARD', seq) > seq_len then
      redis.call('ZREMRANGEBYRANK', seq, 0, -(seq_len + 1))
    end

    -- first/last seen
    local last = tonumber(redis.call('HGET', h, 'last_ts'))
    if not last or ts > last then redis.call('HSET', h, 'last_ts', ts) end
    local first = tonumber(redis.call('HGET', h, 'first_ts'))
    if not first or ts < first then redis.call('HSET', h, 'first_ts', ts) end

    -- time-decayed affinity (per-user landmark)
    local L = tonumber(redis.call('HGET', h, 'aff_L'))
    if not L then L = ts; redis.call('HSET', h, 'aff_L', ts) end
    if (ts - L) / aff_hl > rescale_after then
      rescale(aff, math.pow(2, -(ts - L) / aff_hl))
      L = ts
      redis.call('HSET', h, 'aff_L', ts)
    end
    decayed_add(aff, item, w, ts, aff_hl, L)

    if etype == 'purchase' then
      redis.call('ZADD', u .. ':bought', 'GT', ts, item)
      redis.call('ZADD', u .. ':bought', 'NX', ts, item)
      if redis.call('ZCARD', u .. ':bought') > bought_cap then
        redis.call('ZREMRANGEBYRANK', u .. ':bought', 0, -(bought_cap + 1))
      end
    end

    -- global trending popularity (global landmark) and raw counts
    local PL = tonumber(redis.call('GET', pop_L_key))
    if not PL then PL = ts; redis.call('SET', pop_L_key, ts) end
    if (ts - PL) / pop_hl > rescale_after then
      rescale(pop_key, math.pow(2, -(ts - PL) / pop_hl))
      PL = ts
      redis.call('SET', pop_L_key, ts)
    end
    decayed_add(pop_key, item, w, ts, pop_hl, PL)
    redis.call('ZINCRBY', P .. ':items:n', 1, item)
  else
    dups = dups + 1
    flags[#flags + 1] = 0
  end
end
if applied > 0 then redis.call('HINCRBY', P .. ':stats', 'applied', applied) end
if dups > 0 then redis.call('HINCRBY', P .. ':stats', 'duplicates', dups) end
return flags
"""

READ_LUA = r"""
local P, uid = ARGV[1], ARGV[2]
local seq_n, aff_n, recent_n, covis_n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local u = P .. ':u:' .. uid
local seq = redis.call('ZRANGE', u .. ':seq', -seq_n, -1, 'WITHSCORES')
local out = {
  redis.call('HGETALL', u .. ':h'),
  seq,
  redis.call('ZREVRANGE', u .. ':aff', 0, aff_n - 1, 'WITHSCORES'),
  redis.call('ZRANGE', u .. ':bought', 0, -1),
}
local seen, k = {}, 0
for i = #seq - 1, 1, -2 do
  local item = string.match(seq[i], '^([^|]+)|')
  if not seen[item] then
    seen[item] = true
    k = k + 1
    out[#out + 1] = item
    out[#out + 1] = redis.call('ZREVRANGE', P .. ':covis:' .. item, 0, covis_n - 1, 'WITHSCORES')
    if k >= recent_n then break end
  end
end
return out
"""


@dataclass(frozen=True, slots=True)
class StateReads:
    """How much of a user's state a read returns; a recommender that needs less asks for less.

    Reading co-visitation neighbours for many recent items is the costly part
    of a read: the blending baseline scores with them, while the generative
    model only needs a few for its reasons.
    """

    sequence: int  # newest events of the item sequence
    recent_items: int  # distinct recent items whose co-visited neighbours are read
    neighbours: int = 50  # neighbours per such item
    affinities: int = 100  # top affinities


@dataclass(frozen=True, slots=True)
class SeqEntry:
    item_id: str
    type: str
    ts: int
    event_id: str


@dataclass(slots=True)
class UserState:
    """What the recommenders see of one user (plus the shared trending list)."""

    user_id: str
    sequence: list[SeqEntry] = field(default_factory=list)  # oldest -> newest
    counts: dict[str, int] = field(default_factory=dict)
    first_ts: int | None = None
    last_ts: int | None = None
    affinities: dict[str, float] = field(default_factory=dict)  # item -> relative score
    purchased: set[str] = field(default_factory=set)
    covis: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # recent item -> neighbours
    trending: list[tuple[str, float]] = field(default_factory=list)
    exclude: frozenset[str] = frozenset()  # items the request asked not to see

    @property
    def known(self) -> bool:
        return bool(self.sequence)


def _pairs(flat: Sequence) -> list[tuple[str, float]]:
    return [(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]


class StateStore:
    """Applies events to, and reads user state from, one Redis (sync or asyncio client)."""

    CHUNK = 250  # events per script call: keeps each atomic step short for other clients

    def __init__(self, settings: Settings, prefix: str = PREFIX) -> None:
        self.settings = settings
        self.prefix = prefix
        self._config_args = [
            settings.sequence_length,
            settings.covis_fanout,
            settings.covis_window_ms,
            settings.affinity_half_life_ms,
            settings.trend_half_life_ms,
            settings.dedupe_ttl_s,
            settings.weight_browse,
            settings.weight_click,
            settings.weight_purchase,
            RESCALE_AFTER_HALF_LIVES,
            BOUGHT_CAP,
            prefix,
            TIE_SLOTS,
        ]

    # ---- writing ---------------------------------------------------------------
    def _chunks(self, events: Sequence[Event]) -> list[list]:
        calls = []
        for start in range(0, len(events), self.CHUNK):
            args = list(self._config_args)
            for ev in events[start : start + self.CHUNK]:
                args += [ev.event_id, ev.user_id, ev.item_id, ev.type, ev.ts]
            calls.append(args)
        return calls

    def apply(self, client: redis.Redis, events: Sequence[Event]) -> list[bool]:
        """Apply events in one pipelined round-trip; returns which were new (not duplicates)."""
        if not events:
            return []
        script = client.register_script(APPLY_LUA)
        pipe = client.pipeline(transaction=False)
        for args in self._chunks(events):
            script(args=args, client=pipe)
        return [bool(f) for flags in pipe.execute() for f in flags]

    async def apply_async(self, client: "redis.asyncio.Redis", events: Sequence[Event]) -> list[bool]:
        if not events:
            return []
        script = client.register_script(APPLY_LUA)
        pipe = client.pipeline(transaction=False)
        for args in self._chunks(events):
            await script(args=args, client=pipe)
        return [bool(f) for flags in await pipe.execute() for f in flags]

    # ---- reading ---------------------------------------------------------------
    def default_reads(self) -> StateReads:
        s = self.settings
        return StateReads(sequence=s.sequence_length, recent_items=s.blend_recent_items)

    def _read_args(self, user_id: str, reads: StateReads) -> list:
        return [self.prefix, user_id, reads.sequence, reads.affinities, reads.recent_items, reads.neighbours]

    def _build(self, user_id: str, raw: list, trending: list[tuple[str, float]]) -> UserState:
        h = dict(zip(raw[0][0::2], raw[0][1::2]))
        seq = []
        for member, score in _pairs(raw[1]):
            item, etype, eid = member.split("|", 2)
            seq.append(SeqEntry(item, etype, int(score) // TIE_SLOTS, eid))
        aff = _pairs(raw[2])
        top = aff[0][1] if aff and aff[0][1] > 0 else 1.0
        covis = {raw[i]: _pairs(raw[i + 1]) for i in range(4, len(raw), 2)}
        return UserState(
            user_id=user_id,
            sequence=seq,
            counts={k: int(h[k]) for k in ("browse", "click", "purchase", "n") if k in h},
            first_ts=int(h["first_ts"]) if "first_ts" in h else None,
            last_ts=int(h["last_ts"]) if "last_ts" in h else None,
            affinities={item: score / top for item, score in aff},
            purchased=set(raw[3]),
            covis=covis,
            trending=trending,
        )

    def _trending(self, flat: list) -> list[tuple[str, float]]:
        pairs = _pairs(flat)
        top = pairs[0][1] if pairs and pairs[0][1] > 0 else 1.0
        return [(item, score / top) for item, score in pairs]

    def fetch(self, client: redis.Redis, user_ids: Sequence[str], reads: StateReads | None = None) -> list[UserState]:
        """Users' states and the trending list in one pipelined round-trip."""
        reads = reads or self.default_reads()
        script = client.register_script(READ_LUA)
        pipe = client.pipeline(transaction=False)
        pipe.zrevrange(f"{self.prefix}:pop", 0, self.settings.trending_pool - 1, withscores=True)
        for uid in user_ids:
            script(args=self._read_args(uid, reads), client=pipe)
        res = pipe.execute()
        trending = self._trending([x for pair in res[0] for x in pair])
        return [self._build(uid, raw, trending) for uid, raw in zip(user_ids, res[1:])]

    async def fetch_async(self, client: "redis.asyncio.Redis", user_ids: Sequence[str],
                          reads: StateReads | None = None) -> list[UserState]:
        reads = reads or self.default_reads()
        script = client.register_script(READ_LUA)
        pipe = client.pipeline(transaction=False)
        pipe.zrevrange(f"{self.prefix}:pop", 0, self.settings.trending_pool - 1, withscores=True)
        for uid in user_ids:
            await script(args=self._read_args(uid, reads), client=pipe)
        res = await pipe.execute()
        trending = self._trending([x for pair in res[0] for x in pair])
        return [self._build(uid, raw, trending) for uid, raw in zip(user_ids, res[1:])]

    # ---- helpers for tests, tools and benches ----------------------------------------
    def stats(self, client: redis.Redis) -> dict[str, int]:
        return {k: int(v) for k, v in client.hgetall(f"{self.prefix}:stats").items()}

    def decayed_popularity(self, client: redis.Redis, now_ms: int) -> dict[str, float]:
        """Popularity in absolute units at `now_ms` (undoes the landmark scaling)."""
        landmark = client.get(f"{self.prefix}:pop:L")
        if landmark is None:
            return {}
        factor = math.pow(2, -(now_ms - int(landmark)) / self.settings.trend_half_life_ms)
        return {i: s * factor for i, s in client.zrange(f"{self.prefix}:pop", 0, -1, withscores=True)}
