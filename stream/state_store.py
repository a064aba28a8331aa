"""User state in Redis: the one place that knows the key layout and the update rules.

Writes go through one Lua script per chunk of events so that the check for a
duplicate and every update an event causes commit together. Chunks are
pipelined, so a batch of thousands of events costs one network round-trip.
Each batch's calls and the parsing of their replies are written once, as a plan
(``apply_plan``, ``fetch_plan``), and run on a sync or an asyncio client by the
runners of stream/redis_calls.py: the workers and the tools cannot drift apart.

Exactly once, in memory bounded by users, not by events (README "Delivery guarantees"):

* a *redelivered* record (crash before a commit, rebalance, offsets reset) is at or below its
  user's applied offset for its partition: ``o:{topic}:{partition}`` in the user's hash holds
  "epoch:offset" (epochs tell the incarnations of a log apart: stream/log_positions.py);
* a *resent* event (producer retry, the same file replayed) has an event id among the user's
  last ``dedupe_window`` applied ids: ``rt:u:{u}:ids`` holds their 8-byte fingerprints.

Event ids are unique per user: the same id under two users is two events.

Key layout (``{u}`` is a validated user id, ``{i}`` an item id)::

    rt:u:{u}:h             hash: browse/click/purchase/n counts, first_ts, last_ts, aff_L,
                           o:{topic}:{partition} -> "epoch:offset" applied watermarks
    rt:u:{u}:ids           string: fingerprints of the user's last dedupe_window event ids
    rt:u:{u}:seq           zset: "item|type|event_id" scored by ts*1000 + arrival number mod 1000
                           (capped; ordered by event time, equal times in arrival order)
    rt:u:{u}:aff           zset: item -> forward-decayed affinity (landmark aff_L; top affinity_cap kept)
    rt:u:{u}:bought        zset: purchased item -> latest purchase ts (capped)
    rt:u:{u}:fair          hash: item -> "window:count", the user's events per item in the current
                           fairness window (at most affinity_cap items)
    rt:covis:{i}           zset: co-visited item -> count (top covis_cap kept; expires item_ttl_days
                           after the item's latest event)
    rt:pop                 zset: item -> forward-decayed popularity (landmark rt:pop:L; top items_cap kept)
    rt:items:n             zset: item -> raw event count (top items_cap kept)
    rt:stats               hash: applied / duplicates

Fairness: one user adds at most ``fair_max_per_item`` events per item and
``fair_window_ms`` (event time) to trending and co-visitation, so a bot buying one
item 60 times moves them like a few purchases; its own state counts every event.

A user's keys expire ``user_ttl_days`` after the user's latest event (refreshed
when 1/64 of the TTL has passed): a returning user after that is a new user.

Redis Cluster (``RTREC_REDIS_CLUSTER``): one script step must stay on one hash
slot, yet it touches a user's keys *and* the shared aggregates. So users are
spread over ``redis_cluster_buckets`` buckets (crc32 of the user id) and every
key above lives under its bucket's hash tag, ``rt:{b7}:u:{u}:h``,
``rt:{b7}:pop``, ``rt:{b7}:covis:{i}``, ...: each bucket holds the shared
aggregates of its own users' events (exactly once, atomically with the
duplicate check), and reads merge the buckets' partial popularity and co-visitation
(sums; each bucket's top entries). Buckets, not users, are the unit of
placement, so several buckets per master spread the load.

Time decay uses *forward decay*: an event of weight w at time t adds
w * 2^((t - L)/half_life) for a landmark L. Sums are then independent of the
order events arrive in (out-of-order events land exactly where they belong),
and ranking needs no per-read decay because every score shares the factor
2^(-(now - L)/half_life). When exponents grow large the whole set is rescaled
and L moves forward.
"""

from __future__ import annotations

import json
import math
import zlib
from binascii import b2a_base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from hashlib import blake2b
from typing import Any, NamedTuple

from rtrec.stream import keys, redis_calls
from rtrec.stream.events import Event
from rtrec.stream.log_positions import LogPosition
from rtrec.stream.redis_calls import AsyncClient, Plan, Round, ScriptCall, Steps, SyncClient
from rtrec.stream.settings import Settings

_dumps: Callable[[Any], bytes] | None
try:  # several times faster than json for a chunk's arguments; json when it is not installed
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover - depends on the environment
    _dumps = None

BOUGHT_CAP = 500
RESCALE_AFTER_HALF_LIVES = 60.0
TIE_SLOTS = 1000  # sequence score = ts * 1000 + arrival number: equal timestamps keep arrival order
ID_BYTES = 8  # an event id's fingerprint in a user's window: 48 bits, base64
ARGS_PER_EVENT = 9  # event_id, user, item, type, ts, fingerprint, partition field, epoch, offset
NO_POSITION = ("", "0", "0")


def id_fingerprint(event_id: str) -> str:
    """8 printable characters (48 bits) of the event id's hash: a false duplicate needs a 48-bit
    collision within one user's window (about 1 in 10^12 per event with the default window)."""
    return b2a_base64(blake2b(event_id.encode(), digest_size=6).digest(), newline=False).decode()


def _json(fields: list[str]) -> bytes:
    """A chunk's event fields as one JSON array of strings (APPLY_LUA reads it with cjson)."""
    return _dumps(fields) if _dumps is not None else json.dumps(fields, separators=(",", ":")).encode()


APPLY_LUA = r"""
local ID_BYTES, STRIDE = @ID_BYTES@, @STRIDE@
local seq_len = tonumber(ARGV[1])
local fanout = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local aff_hl = tonumber(ARGV[4])
local pop_hl = tonumber(ARGV[5])
local weights = {browse = tonumber(ARGV[7]), click = tonumber(ARGV[8]), purchase = tonumber(ARGV[9])}
local rescale_after = tonumber(ARGV[10])
local bought_cap = tonumber(ARGV[11])
local P = ARGV[12]
local TIE = tonumber(ARGV[13])
local aff_cap, covis_cap, items_cap = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
local user_ttl, item_ttl = tonumber(ARGV[17]), tonumber(ARGV[18])  -- ms of inactivity; 0: kept
local fair_max, fair_window = tonumber(ARGV[19]), tonumber(ARGV[20])
local id_window = tonumber(ARGV[6]) * ID_BYTES  -- bytes of a user's event-id window
local FIRST = 21
local A = cjson.decode(ARGV[FIRST])  -- the events' fields, STRIDE each, in one JSON array (one argument, not thousands)
local n = #A / STRIDE
local flags = {}
local applied, dups = 0, 0
local windows, needs_ttl = {}, {}  -- ids key -> its window as this script left it; keys to give the user TTL

local function fmt(x) return string.format('%.17g', x) end

-- add w*2^((t-L)/hl) to member of zset (the caller moved L forward first if t is far ahead); returns 0 when
-- the member was there before (its score is not the increment alone), nil when it may be new (for cap).
-- The increment goes as a number: redis.call writes numbers with %.17g itself, as fmt would, in C
local function decayed_add(zkey, member, w, t, hl, L)
  local inc = w * math.pow(2, (t - L) / hl)
  if tonumber(redis.call('ZINCRBY', zkey, inc, member)) ~= inc then return 0 end
  return nil
end

local function rescale(zkey, factor)
  redis.call('ZUNIONSTORE', zkey, 1, zkey, 'WEIGHTS', fmt(factor))
end

-- a TTL in ms (0: none)
local function expire(key, ttl)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end

-- is fingerprint fp one of the window's (fixed-width entries; a match must start on an entry)
local function in_window(buf, fp)
  local pos = string.find(buf, fp, 1, true)
  while pos do
    if (pos - 1) % ID_BYTES == 0 then return true end
    pos = string.find(buf, fp, pos + 1, true)
  end
  return false
end

-- the user's window of recent event-id fingerprints (read once per script)
local function window_of(ids_key)
  local buf = windows[ids_key]
  if buf == nil then
    buf = redis.call('GET', ids_key)
    if not buf then buf = ''; needs_ttl[ids_key] = true end
  end
  return buf
end

-- keep the n highest-scored members (memory bounded by configuration, not by traffic); called after each
-- command that may have added a member: `added` says whether it did (1 or 0) where the reply tells, nil where
-- it does not. cards[zkey] is the set's size as counted in this script plus what was added since: exact while
-- every addition was known (exact[zkey]), else an upper bound. Nothing runs while that is within n; past it,
-- ZREMRANGEBYRANK trims exactly what "ZCARD > n, then trim" trimmed (nothing when the set is within n), so
-- the set ends as before, with one call per event instead of two or three.
local cards, exact = {}, {}
local function cap(zkey, n, added)
  local c = cards[zkey]
  if c == nil then
    c = redis.call('ZCARD', zkey)
    exact[zkey] = true
  elseif added == nil then
    c = c + 1
    exact[zkey] = false
  else
    c = c + added
  end
  if c > n then
    local removed = redis.call('ZREMRANGEBYRANK', zkey, 0, -(n + 1))
    exact[zkey] = exact[zkey] or removed > 0  -- removed nothing: within n, size unknown
    c = n
  end
  cards[zkey] = c
end

-- whether ZINCRBY by 1 added its member: a count that reads 1 was not there before
local function new_count(score)
  if tonumber(score) == 1 then return 1 end
  return 0
end

-- A user's hash (h) as this script sees it: fields read once (nothing else writes them while the script runs),
-- changed in this copy and written back once per user at the end (no one sees the hash meanwhile), instead
-- of three reads and four writes per event
local users = {}
local HOT = {'last_ts', 'first_ts', 'aff_L', 'n', 'browse', 'click', 'purchase'}
local function user_of(h)
  local uc = users[h]
  if uc == nil then
    local got = redis.call('HMGET', h, unpack(HOT))
    uc = {v = {}, order = {}, dirty = {}, ttl_checked = false, refreshed = false}
    for i, name in ipairs(HOT) do uc.v[name] = got[i] end
    users[h] = uc
  end
  return uc
end

local function hget(uc, h, name)  -- the field's value (false: none)
  local v = uc.v[name]
  if v == nil then
    v = redis.call('HGET', h, name)
    uc.v[name] = v
  end
  return v
end

local function hset(uc, name, value)
  uc.v[name] = value
  if not uc.dirty[name] then uc.dirty[name] = true; uc.order[#uc.order + 1] = name end
end

local function hincr(uc, h, name)  -- HINCRBY name 1
  local v = hget(uc, h, name)
  local x = 0
  if v then
    x = tonumber(v)
    if not x or x ~= math.floor(x) then error('ERR hash value is not an integer') end
  end
  hset(uc, name, x + 1)
  return x + 1
end

-- HSET of the named fields of values, at most 100 fields a call (unpack has a limit)
local function hset_fields(key, names, values)
  for from = 1, #names, 100 do
    local args = {}
    for i = from, math.min(from + 99, #names) do args[#args + 1] = names[i]; args[#args + 1] = values[names[i]] end
    redis.call('HSET', key, unpack(args))
  end
end

local function write_users()
  for h, uc in pairs(users) do
    if #uc.order > 0 then
      hset_fields(h, uc.order, uc.v)
      if uc.refreshed then redis.call('PEXPIRE', h, user_ttl) end  -- a new user's h exists only now
    end
  end
end

-- PEXPIRE with the ttl of this script's (frozen) time: once it took, repeating it changes nothing
local expired = {}
local function expire_once(key, ttl)
  if ttl > 0 and not expired[key] and redis.call('PEXPIRE', key, ttl) == 1 then expired[key] = true end
end

-- A user's fairness hash (item -> "window:count"), read field by field and written back once at the end like
-- the user's hash; `cleared`: deleted in this script (over aff_cap items) and started afresh
local fairs = {}
local function fair_of(fair, uc)
  local fc = fairs[fair]
  if fc == nil then
    fc = {v = {}, order = {}, dirty = {}, len = redis.call('HLEN', fair), cleared = false, uc = uc}
    fairs[fair] = fc
  end
  return fc
end

local function fair_get(fc, fair, item)  -- the item's "window:count" (false: none)
  local v = fc.v[item]
  if v == nil then
    if fc.cleared then v = false else v = redis.call('HGET', fair, item) end
    fc.v[item] = v
  end
  return v
end

local function write_fairs()
  for fair, fc in pairs(fairs) do
    if fc.cleared then redis.call('DEL', fair) end
    hset_fields(fair, fc.order, fc.v)
    -- a fresh hash gets the user's TTL; so does one a TTL refresh of this script found missing (a new user)
    if fc.cleared or fc.uc.refreshed then expire(fair, user_ttl) end
  end
end

-- redelivered: at or below the user's applied offset of this partition, in the same log epoch
local function redelivered(uc, h, field, epoch, offset)
  if field == '' then return false end
  local stored = hget(uc, h, 'o:' .. field)
  if not stored then return false end
  local e, o = string.match(stored, '^(%d+):(%d+)$')
  return tonumber(e) == epoch and offset <= tonumber(o)
end

local pop_key = P .. ':pop'
local pop_L_key = P .. ':pop:L'
local items_key = P .. ':items:n'
local PL = nil  -- the popularity landmark, once read

for i = 0, n - 1 do
  local b = 1 + i * STRIDE
  local eid, uid, item, etype, ts = A[b], A[b + 1], A[b + 2], A[b + 3], tonumber(A[b + 4])
  local fp, field, epoch, offset = A[b + 5], A[b + 6], tonumber(A[b + 7]), tonumber(A[b + 8])
  local u = P .. ':u:' .. uid
  local h, seq, aff, ids = u .. ':h', u .. ':seq', u .. ':aff', u .. ':ids'
  local buf = window_of(ids)
  local uc = user_of(h)
  if not redelivered(uc, h, field, epoch, offset) and not in_window(buf, fp) then
    applied = applied + 1
    flags[#flags + 1] = 1
    buf = buf .. fp
    if #buf > id_window then buf = string.sub(buf, -id_window) end
    windows[ids] = buf
    if field ~= '' then hset(uc, 'o:' .. field, A[b + 7] .. ':' .. A[b + 8]) end  -- as sent
    local w = weights[etype]

    -- fairness: one user adds at most fair_max events per item and window to the shared aggregates
    local fair = u .. ':fair'
    local fc = fair_of(fair, uc)
    local window_id = math.floor(ts / fair_window)
    local seen_before = fair_get(fc, fair, item)
    local count = 1
    if seen_before then
      local wid, c = string.match(seen_before, '^(%-?%d+):(%d+)$')
      if tonumber(wid) == window_id then count = tonumber(c) + 1 end
    end
    if fc.len >= aff_cap and not seen_before then  -- a fresh hash (deleted, and given the TTL, at the end)
      fc.cleared, fc.v, fc.order, fc.dirty, fc.len = true, {}, {}, {}, 0
    end
    if not seen_before then fc.len = fc.len + 1 end
    fc.v[item] = window_id .. ':' .. count
    if not fc.dirty[item] then fc.dirty[item] = true; fc.order[#fc.order + 1] = item end
    local shares = count <= fair_max

    -- co-visitation with the user's events near this one in time (bounded fan-out)
    local item_key = P .. ':covis:' .. item
    if fanout > 0 and shares then
      local near = redis.call('ZREVRANGEBYSCORE', seq, (ts + window) * TIE + TIE - 1, (ts - window) * TIE,
                              'LIMIT', 0, fanout * 3)
      local seen, k = {}, 0
      for _, m in ipairs(near) do
        local other = string.match(m, '^([^|]+)|')
        if other ~= item and not seen[other] then
          seen[other] = true
          k = k + 1
          local other_key = P .. ':covis:' .. other
          local here = new_count(redis.call('ZINCRBY', item_key, 1, other))
          local there = new_count(redis.call('ZINCRBY', other_key, 1, item))
          if there == 1 then expire_once(other_key, item_ttl) end
          cap(item_key, covis_cap, here)
          cap(other_key, covis_cap, there)
          if k >= fanout then break end
        end
      end
    end

    expire_once(item_key, item_ttl)  -- an item's co-visitation lives while the item has events

    -- counts first: the user's event number breaks ties between equal timestamps
    hincr(uc, h, etype)
    local nth = hincr(uc, h, 'n')

    -- recent sequence, ordered by event time then arrival, capped
    cap(seq, seq_len, redis.call('ZADD', seq, ts * TIE + (nth % TIE), item .. '|' .. etype .. '|' .. eid))

    -- first/last seen
    local last = tonumber(hget(uc, h, 'last_ts'))
    if not last or ts > last then hset(uc, 'last_ts', ts) end
    local first = tonumber(hget(uc, h, 'first_ts'))
    if not first or ts < first then hset(uc, 'first_ts', ts) end

    -- time-decayed affinity (per-user landmark)
    local L = tonumber(hget(uc, h, 'aff_L'))
    if not L then L = ts; hset(uc, 'aff_L', ts) end
    if (ts - L) / aff_hl > rescale_after then
      rescale(aff, math.pow(2, -(ts - L) / aff_hl))
      expire(aff, user_ttl)  -- the rescale rewrote the key
      L = ts
      hset(uc, 'aff_L', ts)
    end
    cap(aff, aff_cap, decayed_add(aff, item, w, ts, aff_hl, L))

    if etype == 'purchase' then
      redis.call('ZADD', u .. ':bought', 'GT', ts, item)
      redis.call('ZADD', u .. ':bought', 'NX', ts, item)
      expire(u .. ':bought', user_ttl)
      if redis.call('ZCARD', u .. ':bought') > bought_cap then
        redis.call('ZREMRANGEBYRANK', u .. ':bought', 0, -(bought_cap + 1))
      end
    end

    -- retention: a user's keys live until RTREC_USER_TTL_DAYS after their latest event; refreshed
    -- when 1/64 of the TTL has passed (one PTTL per event instead of five PEXPIREs)
    -- (checked once per user and script: the script's time stands still, so a second PTTL reads the same)
    if user_ttl > 0 and not uc.ttl_checked then
      uc.ttl_checked = true
      if redis.call('PTTL', h) < user_ttl - math.floor(user_ttl / 64) then
        uc.refreshed = true
        for _, key in ipairs({h, seq, aff, u .. ':bought', fair}) do redis.call('PEXPIRE', key, user_ttl) end
        needs_ttl[ids] = true  -- expires with the others once written below
      end
    end

    -- global trending popularity (global landmark) and raw counts
    if PL == nil then PL = tonumber(redis.call('GET', pop_L_key)) or false end  -- read once per script
    if not PL then PL = ts; redis.call('SET', pop_L_key, ts) end
    if (ts - PL) / pop_hl > rescale_after then
      rescale(pop_key, math.pow(2, -(ts - PL) / pop_hl))
      PL = ts
      redis.call('SET', pop_L_key, ts)
    end
    if shares then
      cap(pop_key, items_cap, decayed_add(pop_key, item, w, ts, pop_hl, PL))
    end
    cap(items_key, items_cap, new_count(redis.call('ZINCRBY', items_key, 1, item)))
  else
    dups = dups + 1
    flags[#flags + 1] = 0
  end
end
write_users()
write_fairs()
for ids, buf in pairs(windows) do
  redis.call('SET', ids, buf, 'KEEPTTL')
  if needs_ttl[ids] then expire(ids, user_ttl) end
end
if applied > 0 then redis.call('HINCRBY', P .. ':stats', 'applied', applied) end
if dups > 0 then redis.call('HINCRBY', P .. ':stats', 'duplicates', dups) end
return flags
""".replace("@ID_BYTES@", str(ID_BYTES)).replace("@STRIDE@", str(ARGS_PER_EVENT))

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
    if covis_n > 0 then
      out[#out + 1] = redis.call('ZREVRANGE', P .. ':covis:' .. item, 0, covis_n - 1, 'WITHSCORES')
    else
      out[#out + 1] = {}
    end
    if k >= recent_n then break end
  end
end
return out
"""


COVIS_LUA = r"""
local P, n = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = redis.call('ZREVRANGE', P .. ':covis:' .. ARGV[i], 0, n - 1, 'WITHSCORES')
end
return out
"""

TRENDING_LUA = r"""
local L = redis.call('GET', ARGV[1] .. ':pop:L') or ''
return {L, redis.call('ZREVRANGE', ARGV[1] .. ':pop', 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')}
"""


Neighbours = dict[str, list[tuple[str, float]]]  # item -> its co-visited neighbours, most counted first


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


class SeqEntry(NamedTuple):
    """One event of a user's sequence. A named tuple, not a frozen dataclass: the recommend worker builds
    up to 200 per user per request, and a frozen dataclass costs several times as much to create."""

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
    allow: frozenset[str] | None = None  # when set, the only items that may be returned (a re-ranking's candidates)

    @property
    def known(self) -> bool:
        return bool(self.sequence)


def _pairs(flat: Sequence[Any]) -> list[tuple[str, float]]:
    """A flat WITHSCORES reply, ``[member, score, ...]``, as (member, score) pairs."""
    return list(zip(flat[0::2], map(float, flat[1::2])))  # the recommend worker's hottest loop: no Python indexing


def _split_member(member: str) -> list[str]:
    """A sequence member, ``item|type|event_id``, as its three parts (the event id may hold '|')."""
    return member.split("|", 2)


def _relative(pairs: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Scores relative to the highest (forward-decayed scores only compare within one landmark)."""
    top = pairs[0][1] if pairs and pairs[0][1] > 0 else 1.0
    return [(item, score / top) for item, score in pairs]


def _ranked(sums: dict[str, float], n: int) -> list[tuple[str, float]]:
    """The n highest sums, ties by name (cluster merges: the order one Redis would give)."""
    return sorted(sums.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One APPLY_LUA call: about CHUNK events of one key prefix (one cluster bucket), whole users."""

    prefix: str
    numbers: list[int]  # the events' places in the batch
    args: list[str | bytes | int | float]


class StateStore:
    """Applies events to, and reads user state from, one Redis or a Redis Cluster (sync or asyncio client).

    Each batch is built once as a plan of Redis calls (``apply_plan``, ``fetch_plan``) and run by
    stream/redis_calls.py on whichever client the caller holds: ``apply``/``fetch`` take a sync
    client, ``apply_async``/``fetch_async`` an asyncio one.
    """

    CHUNK = 250  # events per script call: keeps each atomic step short for other clients

    def __init__(self, settings: Settings, prefix: str = keys.PREFIX) -> None:
        self.settings = settings
        self.prefix = prefix
        self.buckets: int = settings.redis_cluster_buckets if settings.redis_cluster else 0
        self._config_args: list[str | int | float] = [
            settings.sequence_length,
            settings.covis_fanout,
            settings.covis_window_ms,
            settings.affinity_half_life_ms,
            settings.trend_half_life_ms,
            settings.dedupe_window,
            settings.weight_browse,
            settings.weight_click,
            settings.weight_purchase,
            RESCALE_AFTER_HALF_LIVES,
            BOUGHT_CAP,
        ]
        self._cap_args: list[str | int | float] = [
            settings.affinity_cap,
            settings.covis_cap,
            settings.items_cap,
            round(settings.user_ttl_days * 86_400_000),
            round(settings.item_ttl_days * 86_400_000),
            settings.fair_max_per_item,
            settings.fair_window_ms,
        ]

    # ---- where keys live ---------------------------------------------------------------
    def user_prefix(self, user_id: str) -> str:
        """The prefix of a user's keys (and, in a cluster, of its bucket's shared aggregates)."""
        if not self.buckets:
            return self.prefix
        return keys.bucket_prefix(self.prefix, zlib.crc32(user_id.encode()) % self.buckets)

    def shard_prefixes(self) -> list[str]:
        """Every prefix holding a part of the shared aggregates: one, or one per cluster bucket."""
        if not self.buckets:
            return [self.prefix]
        return [keys.bucket_prefix(self.prefix, b) for b in range(self.buckets)]

    def user_key(self, user_id: str, part: str) -> str:
        """e.g. ``user_key(u, "h")``: the user's hash of counts."""
        return keys.user_key(self.user_prefix(user_id), user_id, part)

    # ---- writing ---------------------------------------------------------------
    def apply(
        self, client: SyncClient, events: Sequence[Event], positions: Sequence[LogPosition | None] | None = None
    ) -> list[bool]:
        """Apply events (one pipelined round-trip on one Redis); returns which were new (not duplicates).

        ``positions`` (one per event, from ``stream.log_positions``) lets redelivered records be
        recognised by offset; without them only the users' event-id windows dedupe.
        """
        return redis_calls.run(client, self.apply_plan(events, positions))

    async def apply_async(
        self, client: AsyncClient, events: Sequence[Event], positions: Sequence[LogPosition | None] | None = None
    ) -> list[bool]:
        """``apply`` with an asyncio client (the state worker); a cluster's buckets are written concurrently."""
        return await redis_calls.run_async(client, self.apply_plan(events, positions))

    def apply_plan(
        self, events: Sequence[Event], positions: Sequence[LogPosition | None] | None = None
    ) -> Plan[list[bool]]:
        """The Redis work of ``apply``: one APPLY_LUA call per chunk, pipelined on one Redis; in a
        cluster each call goes to its bucket's master, a bucket's calls in order."""
        return Plan(partial(self._apply_steps, events, positions))

    def _apply_steps(
        self, events: Sequence[Event], positions: Sequence[LogPosition | None] | None
    ) -> Steps[list[bool]]:
        if not events:
            return []
        chunks = self._chunks(events, positions)
        calls = [ScriptCall(APPLY_LUA, [chunk.prefix], chunk.args) for chunk in chunks]
        # on a cluster a bucket's calls share its hash slot: they run in batch order on its master
        results = yield Round(calls, pipelined=not self.buckets)
        flags = [False] * len(events)
        for chunk, reply in zip(chunks, results):
            for i, flag in zip(chunk.numbers, reply):
                flags[i] = bool(flag)
        return flags

    def _chunks(self, events: Sequence[Event], positions: Sequence[LogPosition | None] | None) -> list[_Chunk]:
        """The batch cut into script calls: one key prefix per call, about CHUNK events, whole users.

        A user's events never straddle two calls: the calls of a pipeline succeed or fail one by one
        (Redis at its memory limit fails some), and a later event applied before an earlier one failed
        would raise the user's watermark above it, so the retry would skip the earlier one as redelivered.
        One user with more than CHUNK events in a batch gets a call of their own.
        """
        chunks = []
        for prefix, by_user in self._users_by_prefix(events).items():
            part: list[int] = []
            for numbers in by_user.values():
                if part and len(part) + len(numbers) > self.CHUNK:
                    chunks.append(self._chunk(prefix, part, events, positions))
                    part = []
                part += numbers
            chunks.append(self._chunk(prefix, part, events, positions))
        return chunks

    def _users_by_prefix(self, events: Sequence[Event]) -> dict[str, dict[str, list[int]]]:
        """prefix -> user -> the user's event numbers, in batch order (one prefix unless clustered)."""
        if self.buckets:
            users: dict[str, dict[str, list[int]]] = {}
            for number, ev in enumerate(events):
                users.setdefault(self.user_prefix(ev.user_id), {}).setdefault(ev.user_id, []).append(number)
            return users
        by_user: dict[str, list[int]] = {}
        for number, ev in enumerate(events):  # the hot path of one Redis: no prefix per event
            numbers = by_user.get(ev.user_id)
            if numbers is None:
                by_user[ev.user_id] = [number]
            else:
                numbers.append(number)
        return {self.prefix: by_user}

    def _chunk(
        self, prefix: str, numbers: list[int], events: Sequence[Event], positions: Sequence[LogPosition | None] | None
    ) -> _Chunk:
        """One APPLY_LUA call's arguments: the settings, then every event's fields with its log position in
        one JSON array. One argument instead of ARGS_PER_EVENT per event: the client encodes each argument
        on its own, which cost more than the rest of the batch's work in the state worker."""
        fields: list[str] = []
        add = fields.extend
        for i in numbers:
            ev = events[i]
            at = positions[i] if positions is not None else None
            add((ev.event_id, ev.user_id, ev.item_id, ev.type, str(ev.ts), id_fingerprint(ev.event_id)))
            add((at.field, str(at.epoch), str(at.offset)) if at is not None else NO_POSITION)
        return _Chunk(prefix, numbers, [*self._config_args, prefix, TIE_SLOTS, *self._cap_args, _json(fields)])

    # ---- reading ---------------------------------------------------------------
    def default_reads(self) -> StateReads:
        s = self.settings
        return StateReads(sequence=s.sequence_length, recent_items=s.blend_recent_items)

    def fetch(self, client: SyncClient, user_ids: Sequence[str], reads: StateReads | None = None) -> list[UserState]:
        """Users' states and the trending list in one pipelined round-trip (two rounds in a cluster).

        A dropped connection (Redis restarted since the last call) is retried once: a read is safe to repeat.
        """
        return redis_calls.run(client, self.fetch_plan(user_ids, reads))

    async def fetch_async(
        self, client: AsyncClient, user_ids: Sequence[str], reads: StateReads | None = None
    ) -> list[UserState]:
        """``fetch`` with an asyncio client (the recommend worker)."""
        return await redis_calls.run_async(client, self.fetch_plan(user_ids, reads))

    def fetch_plan(self, user_ids: Sequence[str], reads: StateReads | None = None) -> Plan[list[UserState]]:
        """The Redis work of ``fetch``: trending and one READ_LUA call per user, pipelined on one Redis;
        in a cluster a first round reads the users and every bucket's trending, a second the buckets'
        co-visitation of the users' recent items."""
        steps = self._cluster_fetch_steps if self.buckets else self._fetch_steps
        return Plan(partial(steps, user_ids, reads or self.default_reads()), repeatable=True)

    def _read_call(self, user_id: str, reads: StateReads, routed: bool) -> ScriptCall:
        neighbours = 0 if self.buckets else reads.neighbours  # a cluster merges them from every bucket
        prefix = self.user_prefix(user_id)
        return ScriptCall(
            READ_LUA,
            [prefix] if routed else [],
            [prefix, user_id, reads.sequence, reads.affinities, reads.recent_items, neighbours],
        )

    def _fetch_steps(self, user_ids: Sequence[str], reads: StateReads) -> Steps[list[UserState]]:
        top = redis_calls.zrevrange_with_scores(keys.trending(self.prefix), 0, self.settings.trending_pool - 1)
        replies = yield Round([top, *(self._read_call(uid, reads, routed=False) for uid in user_ids)])
        trending = _relative(_scored(replies[0]))
        return [_user_state(uid, raw, trending) for uid, raw in zip(user_ids, replies[1:])]

    def _cluster_fetch_steps(self, user_ids: Sequence[str], reads: StateReads) -> Steps[list[UserState]]:
        shards = self.shard_prefixes()
        users = [self._read_call(uid, reads, routed=True) for uid in user_ids]
        pools = [ScriptCall(TRENDING_LUA, [p], [p, self.settings.trending_pool]) for p in shards]
        replies = yield Round([*users, *pools], pipelined=False)
        raws, trending_parts = replies[: len(users)], replies[len(users) :]
        items = _recent_items(raws)
        covis_parts: list[Any] = []
        if items:
            covis_parts = yield Round(
                [ScriptCall(COVIS_LUA, [p], [p, reads.neighbours, *items]) for p in shards], pipelined=False
            )
        trending = self._merged_trending(trending_parts)
        covis = _merged_covis(items, covis_parts, reads.neighbours)
        return [_user_state(uid, raw, trending, covis) for uid, raw in zip(user_ids, raws)]

    async def neighbours_async(self, client: AsyncClient, items: Sequence[str], n: int) -> Neighbours:
        """Each item's `n` most co-visited neighbours (similar-item queries), merged over the buckets in a cluster."""
        return await redis_calls.run_async(client, self.neighbours_plan(items, n))

    def neighbours_plan(self, items: Sequence[str], n: int) -> Plan[Neighbours]:
        """The Redis work of ``neighbours_async``: one COVIS_LUA call per bucket (one on a single Redis)."""

        def steps() -> Steps[Neighbours]:
            if not items:
                return {}
            shards = self.shard_prefixes()
            calls = [ScriptCall(COVIS_LUA, [p] if self.buckets else [], [p, n, *items]) for p in shards]
            parts = yield Round(calls, pipelined=not self.buckets)
            if not self.buckets:
                return {item: _pairs(flat) for item, flat in zip(items, parts[0])}
            return _merged_covis(items, parts, n)

        return Plan(steps, repeatable=True)

    def _merged_trending(self, parts: Sequence[Any]) -> list[tuple[str, float]]:
        """The buckets' partial popularity (TRENDING_LUA replies) brought to one landmark and summed."""
        hl = self.settings.trend_half_life_ms
        ref = max((int(landmark) for landmark, _ in parts if landmark), default=0)
        pop: dict[str, float] = {}
        for landmark, flat in parts:
            if not landmark:
                continue
            factor = math.pow(2, (int(landmark) - ref) / hl)
            for item, score in _pairs(flat):
                pop[item] = pop.get(item, 0.0) + score * factor
        return _relative(_ranked(pop, self.settings.trending_pool))

    # ---- helpers for tests, tools and benches ----------------------------------------
    def stats(self, client: SyncClient) -> dict[str, int]:
        """applied / duplicates, summed over the buckets in a cluster."""
        out: dict[str, int] = {}
        for p in self.shard_prefixes():
            for k, v in client.hgetall(f"{p}:stats").items():
                name = redis_calls.text(k)
                out[name] = out.get(name, 0) + int(v)
        return out

    def item_counts(self, client: SyncClient) -> dict[str, float]:
        """Raw event count per item."""
        out: dict[str, float] = {}
        for p in self.shard_prefixes():
            for item, n in _scored(client.zrange(f"{p}:items:n", 0, -1, withscores=True)):
                out[item] = out.get(item, 0.0) + n
        return out

    def decayed_popularity(self, client: SyncClient, now_ms: int) -> dict[str, float]:
        """Popularity in absolute units at `now_ms` (undoes the landmark scaling)."""
        out: dict[str, float] = {}
        for p in self.shard_prefixes():
            landmark = client.get(f"{p}:pop:L")
            if landmark is None:
                continue
            factor = math.pow(2, -(now_ms - int(landmark)) / self.settings.trend_half_life_ms)
            for item, score in _scored(client.zrange(keys.trending(p), 0, -1, withscores=True)):
                out[item] = out.get(item, 0.0) + score * factor
        return out


def _scored(reply: Any) -> list[tuple[str, float]]:
    """A parsed WITHSCORES reply, (member, score) pairs, typed."""
    return [(redis_calls.text(member), float(score)) for member, score in reply]


def _user_state(
    user_id: str,
    raw: Sequence[Any],
    trending: list[tuple[str, float]],
    merged_covis: dict[str, list[tuple[str, float]]] | None = None,
) -> UserState:
    """A READ_LUA reply as a UserState; in a cluster the recent items' neighbours come merged from every bucket."""
    h = dict(zip(raw[0][0::2], raw[0][1::2]))
    flat = raw[1]
    sequence = [
        SeqEntry(parts[0], parts[1], int(score) // TIE_SLOTS, parts[2])
        for parts, score in zip(map(_split_member, flat[0::2]), flat[1::2])
    ]
    recent = range(4, len(raw), 2)  # after hash, sequence, affinities, purchases: item, neighbours, item, ...
    if merged_covis is None:
        covis = {raw[i]: _pairs(raw[i + 1]) for i in recent}
    else:
        covis = {raw[i]: merged_covis.get(raw[i], []) for i in recent}
    return UserState(
        user_id=user_id,
        sequence=sequence,
        counts={k: int(h[k]) for k in ("browse", "click", "purchase", "n") if k in h},
        first_ts=int(h["first_ts"]) if "first_ts" in h else None,
        last_ts=int(h["last_ts"]) if "last_ts" in h else None,
        affinities=dict(_relative(_pairs(raw[2]))),
        purchased=set(raw[3]),
        covis=covis,
        trending=trending,
    )


def _merged_covis(items: Sequence[str], parts: Sequence[Any], neighbours: int) -> Neighbours:
    """The buckets' co-visitation of `items` (COVIS_LUA replies) summed, each item's top `neighbours` kept."""
    sums: dict[str, dict[str, float]] = {item: {} for item in items}
    for part in parts:
        for item, flat in zip(items, part):
            for other, score in _pairs(flat):
                sums[item][other] = sums[item].get(other, 0.0) + score
    return {item: _ranked(scores, neighbours) for item, scores in sums.items()}


def _recent_items(raws: Sequence[Sequence[Any]]) -> list[str]:
    """Distinct recent items named by the users' READ_LUA replies (cluster mode)."""
    return list(dict.fromkeys(raw[i] for raw in raws for i in range(4, len(raw), 2)))
