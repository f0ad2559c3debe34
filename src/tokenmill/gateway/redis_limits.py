"""The limits of limits.py shared by several gateways through one Redis.

Each check-and-record is one Lua script, which Redis runs atomically, on Redis's own clock
(`TIME`), so gateways with skewed clocks still agree. In-flight slots and budget
reservations are leases: if a gateway dies, its reservations expire instead of leaking.

Keys per scope (`tm:<scope>:...`): `r` zset of admissions, `t` zset + `tn` hash of token
entries and `ts` their sum, `f` zset of in-flight leases. Per budget (`tm:b:<id>...`): a
hash of spent/reserved totals, `l` zset of reservation leases, `a` hash of their amounts.
All keys of one request are touched by one script, so they must live on one Redis node
(a single Redis or a primary; not a sharded cluster).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from tokenmill.gateway.limits import (
    USD_TOLERANCE,
    WINDOW_S,
    BudgetState,
    Decision,
    LoadSpend,
    Reservation,
    budget_decision,
    budget_state,
    headers_view,
    no_stored_spend,
)

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local rid = ARGV[3]
local tokens = tonumber(ARGV[4])
local usd = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local function del_fields(h, ids)
  for i = 1, #ids, 500 do
    redis.call('HDEL', h, unpack(ids, i, math.min(i + 499, #ids)))
  end
end
"""

# ARGV: window, lease, rid, tokens, usd, n, (rpm, tpm, max_parallel) x n, has_budget,
#       max_tokens, max_usd, expire_at, usd_tolerance   (-1 = no limit; expire_at 0 = never)
# Returns {"ok", count_i, oldest_age_i, tokens_used_i ...} or
#         {"no", limit, scope_index, limit_value, used, retry_after (-1 = none)} or
#         {"budget", which, used, open_reservations} or
#         {"seed"}: the budget is not in Redis yet (first use, or Redis lost it)
_ADMIT = _COMMON + """
local cutoff = now - window
local counts, ages, used = {}, {}, {}
for i = 1, n do
  local k = (i - 1) * 5
  local rz, tz, th, tsum, fz = KEYS[k+1], KEYS[k+2], KEYS[k+3], KEYS[k+4], KEYS[k+5]
  local a = 6 + (i - 1) * 3
  local rpm, tpm, par = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
  redis.call('ZREMRANGEBYSCORE', rz, '-inf', cutoff)
  local old = redis.call('ZRANGEBYSCORE', tz, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for _, id in ipairs(old) do freed = freed + tonumber(redis.call('HGET', th, id) or '0') end
    del_fields(th, old)
    redis.call('ZREMRANGEBYSCORE', tz, '-inf', cutoff)
    redis.call('DECRBY', tsum, freed)
  end
  redis.call('ZREMRANGEBYSCORE', fz, '-inf', now)
  if par >= 0 then
    local inflight = redis.call('ZCARD', fz)
    if inflight >= par then return {'no', 'parallel', i, par, inflight, '1'} end
  end
  local count = redis.call('ZCARD', rz)
  if rpm >= 0 and count >= rpm then
    local first = redis.call('ZRANGE', rz, 0, 0, 'WITHSCORES')
    local retry = '-1'
    if #first > 0 then retry = tostring(tonumber(first[2]) + window - now) end
    return {'no', 'requests', i, rpm, count, retry}
  end
  local u = tonumber(redis.call('GET', tsum) or '0')
  if tpm >= 0 and u + tokens > tpm then
    local retry = '-1'
    if tokens <= tpm then
      local left = u
      local entries = redis.call('ZRANGE', tz, 0, -1, 'WITHSCORES')
      retry = '0'
      for j = 1, #entries, 2 do
        left = left - tonumber(redis.call('HGET', th, entries[j]) or '0')
        if left + tokens <= tpm then retry = tostring(tonumber(entries[j+1]) + window - now); break end
      end
    end
    return {'no', 'tokens', i, tpm, u, retry}
  end
  counts[i], used[i] = count, u
  local first = redis.call('ZRANGE', rz, 0, 0, 'WITHSCORES')
  if #first > 0 then ages[i] = tostring(now - tonumber(first[2])) else ages[i] = '0' end
end
local b = 6 + n * 3
if tonumber(ARGV[b+1]) == 1 then
  local bh, bl, ba = KEYS[n*5+1], KEYS[n*5+2], KEYS[n*5+3]
  if redis.call('HEXISTS', bh, 'seeded') == 0 then return {'seed'} end
  local gone = redis.call('ZRANGEBYSCORE', bl, '-inf', now)
  for _, id in ipairs(gone) do
    local amt = redis.call('HGET', ba, id)
    if amt then
      local sp = string.find(amt, ' ')
      redis.call('HINCRBY', bh, 'reserved_tokens', -tonumber(string.sub(amt, 1, sp - 1)))
      redis.call('HINCRBYFLOAT', bh, 'reserved_usd', -tonumber(string.sub(amt, sp + 1)))
    end
  end
  if #gone > 0 then del_fields(ba, gone); redis.call('ZREMRANGEBYSCORE', bl, '-inf', now) end
  local st = tonumber(redis.call('HGET', bh, 'spent_tokens') or '0')
  local su = tonumber(redis.call('HGET', bh, 'spent_usd') or '0')
  local rt = tonumber(redis.call('HGET', bh, 'reserved_tokens') or '0')
  local ru = tonumber(redis.call('HGET', bh, 'reserved_usd') or '0')
  local max_t, max_u = tonumber(ARGV[b+2]), tonumber(ARGV[b+3])
  if max_t >= 0 and st + rt + tokens > max_t then
    return {'budget', 'budget_tokens', tostring(st + rt), redis.call('ZCARD', bl)}
  end
  if max_u >= 0 and su + ru + usd > max_u + tonumber(ARGV[b+5]) then
    return {'budget', 'budget_usd', tostring(su + ru), redis.call('ZCARD', bl)}
  end
  redis.call('HINCRBY', bh, 'reserved_tokens', tokens)
  redis.call('HINCRBYFLOAT', bh, 'reserved_usd', usd)
  redis.call('ZADD', bl, now + lease, rid)
  redis.call('HSET', ba, rid, tokens .. ' ' .. usd)
  local expire_at = tonumber(ARGV[b+4])
  if expire_at > 0 then
    for _, key in ipairs({bh, bl, ba}) do redis.call('EXPIREAT', key, math.ceil(expire_at)) end
  end
end
local out = {'ok'}
for i = 1, n do
  local k = (i - 1) * 5
  redis.call('ZADD', KEYS[k+1], now, rid)
  redis.call('ZADD', KEYS[k+2], now, rid)
  redis.call('HSET', KEYS[k+3], rid, tokens)
  redis.call('INCRBY', KEYS[k+4], tokens)
  redis.call('ZADD', KEYS[k+5], now + lease, rid)
  -- Idle scopes disappear on their own once nothing in them can matter.
  for j = 1, 5 do redis.call('PEXPIRE', KEYS[k+j], math.ceil((lease + window) * 1000)) end
  table.insert(out, counts[i] + 1)
  table.insert(out, ages[i])
  table.insert(out, used[i] + tokens)
end
return out
"""

# KEYS: the budget hash. ARGV: stored tokens, stored usd, expire_at (0 = never). Adds the
# stored spend once (a hash recreated by a settlement after Redis lost it keeps that too).
_SEED = """
if redis.call('HSETNX', KEYS[1], 'seeded', 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'spent_tokens', ARGV[1])
  redis.call('HINCRBYFLOAT', KEYS[1], 'spent_usd', ARGV[2])
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[3]))) end
end
return 1
"""

# ARGV: window, lease, rid, tokens, usd, n, has_budget. Returns {spent_tokens, spent_usd} or {}.
_SETTLE = _COMMON + """
for i = 1, n do
  local k = (i - 1) * 5
  redis.call('ZREM', KEYS[k+5], rid)
  local old = redis.call('HGET', KEYS[k+3], rid)
  if old then
    redis.call('INCRBY', KEYS[k+4], tokens - tonumber(old))
    redis.call('HSET', KEYS[k+3], rid, tokens)
  end
end
if tonumber(ARGV[7]) == 1 then
  local bh, bl, ba = KEYS[n*5+1], KEYS[n*5+2], KEYS[n*5+3]
  local amt = redis.call('HGET', ba, rid)
  if amt then
    local sp = string.find(amt, ' ')
    redis.call('HINCRBY', bh, 'reserved_tokens', -tonumber(string.sub(amt, 1, sp - 1)))
    redis.call('HINCRBYFLOAT', bh, 'reserved_usd', -tonumber(string.sub(amt, sp + 1)))
    redis.call('HDEL', ba, rid)
    redis.call('ZREM', bl, rid)
  end
  local st = redis.call('HINCRBY', bh, 'spent_tokens', tokens)
  local su = redis.call('HINCRBYFLOAT', bh, 'spent_usd', usd)
  return {st, su}
end
return {}
"""


def _keys(res: Reservation) -> list[str]:
    keys = [f"tm:{s.id}:{part}" for s in res.scopes for part in ("r", "t", "tn", "ts", "f")]
    if res.budget is not None:
        keys += [f"tm:b:{res.budget.id}", f"tm:b:{res.budget.id}:l", f"tm:b:{res.budget.id}:a"]
    return keys


def _lim(value) -> str:
    return "-1" if value is None else repr(value)


class RedisLimiter:
    """The limits shared by every gateway pointed at the same Redis.

    Args:
        url: redis://host:port/db
        load_spend: a budget's stored spend, read when Redis does not hold the budget.
        lease_s: how long an in-flight slot or budget reservation outlives a gateway that
            died holding it (longer than any request may take).
        window_s: the rate window (60 s; shorter only in tests).
    """

    def __init__(self, url: str, load_spend: LoadSpend = no_stored_spend, lease_s: float = 900.0,
                 window_s: float = WINDOW_S) -> None:
        # A bounded pool that waits for a free connection (the default one raises when a burst of
        # concurrent requests wants more); each call holds its connection for one round trip.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=30)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._load_spend = load_spend
        self._lease_s = lease_s
        self._window_s = window_s
        self._admit = self._redis.register_script(_ADMIT)
        self._seed = self._redis.register_script(_SEED)
        self._settle = self._redis.register_script(_SETTLE)

    async def ping(self) -> None:
        await self._redis.ping()

    def _argv(self, res: Reservation, tokens: int, usd: float) -> list[str]:
        return [repr(self._window_s), repr(self._lease_s), res.request_id, str(tokens), repr(usd), str(len(res.scopes))]

    async def admit(self, res: Reservation) -> Decision:
        argv = self._argv(res, res.tokens, res.usd)
        for s in res.scopes:
            argv += [_lim(s.rpm), _lim(s.tpm), _lim(s.max_parallel)]
        b = res.budget
        argv += ["1", _lim(b.max_tokens), _lim(b.max_usd), repr(b.reset_at or 0), repr(USD_TOLERANCE)] if b else ["0"]
        out = await self._run_admit(res, argv)
        if out[0] == "seed":  # first use, or Redis lost it: start from the stored spend, then check
            tokens, usd = await self._load_spend(b.id)
            await self._seed(keys=[f"tm:b:{b.id}"], args=[tokens, repr(usd), repr(b.reset_at or 0)])
            out = await self._run_admit(res, argv)
        if out[0] == "ok":
            n = len(res.scopes)
            return headers_view(res.scopes, [int(out[1 + 3 * i]) for i in range(n)],
                                [float(out[2 + 3 * i]) for i in range(n)],
                                [int(out[3 + 3 * i]) for i in range(n)], self._window_s)
        if out[0] == "budget":
            return budget_decision(b, out[1], float(out[2]), int(out[3]) > 0, time.time())
        if out[0] == "seed":
            raise RuntimeError(f"Redis did not keep the budget {b.id} it was just given (is it evicting keys?)")
        _, limit, index, value, used, retry = out
        return Decision(False, limit, res.scopes[int(index) - 1].id, float(value), float(used),
                        None if float(retry) < 0 else max(0.0, float(retry)))

    async def _run_admit(self, res: Reservation, argv: list[str]) -> list:
        return [x.decode() if isinstance(x, bytes) else x for x in await self._admit(_keys(res), argv)]

    async def settle(self, res: Reservation, tokens: int, usd: float) -> BudgetState | None:
        argv = self._argv(res, tokens, usd) + ["1" if res.budget else "0"]
        out = await self._settle(_keys(res), argv)
        if not out:
            return None
        return budget_state(res.budget, int(out[0]), float(out[1]))

    async def close(self) -> None:
        await self._redis.aclose()
