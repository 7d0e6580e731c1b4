"""Lua scripts: every multi-key step that must be atomic. Each touches one session's slot.

A run's state is a hash (``Keys.run``): ``status`` (queued, running, done, failed,
cancelled), ``attempt``, ``fence`` (a random token per attempt), ``owner``, ``lease``
(Unix ms the current attempt is good until), ``emitted`` (how many events the attempt
has written), ``cancel`` (1 once asked to), ``result``, ``order`` (its arrival order in
its session, given at admission), ``created`` and ``user`` (when it was admitted, and
whose run slot it holds).

Runs of one session run one at a time, in arrival order: ``ADMIT`` numbers each run and
puts it in the session's queue (``Keys.session_queue``, a sorted set by that number),
``START`` tells a run to wait while an earlier one is in the queue, and whatever ends a
run (``APPEND``, ``END_LOST``, ``WITHDRAW``) takes it out.
"""

# Time inside a script: Redis 7 replicates script effects, so TIME is allowed.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: meta, log, channel, run, session's unfinished runs (a set), session's memory,
#       session's queue.
# ARGV: maxlen, ttl, epoch seed, fence, min-seq, first-n, terminal-status, result, run,
#       turn to remember, turns kept, runs-ended channel, heads...
#
# * Fencing: only the attempt holding the run's fence may write. A stale attempt (its
#   worker paused past its lease) gets -1 and writes nothing.
# * Idempotence: head i (from 0) of a call is the attempt's event number first-n + i; numbers
#   already ``emitted`` are skipped, so retrying a call whose reply was lost is safe. That
#   holds for the call that ended the run too: its attempt keeps the fence, and a retry
#   that brings nothing new gets the log's seq; anything new after the end gets -1.
# * Epochs: if the log's meta is gone, or its seq is below what this run last wrote
#   (Redis lost writes), the log restarts under a new epoch (the writer's seed and the
#   server's clock in microseconds, so no two restarts share one), so resuming clients are
#   told of the loss instead of being handed renumbered events.
# * Incarnations: the meta keeps the replication id of the master that wrote it
#   (``master_replid``, which Redis draws anew at every start and every promotion of a
#   replica). Replication is asynchronous, so a master that is new since the meta's last
#   write may lack events that watchers already hold, and no writer but the run's own
#   knows how far they went: the first call on a new incarnation starts a new epoch, so
#   no seq of the old epoch is ever given to another event (docs/reliability.md,
#   "Failover"). A new id is not always a new incarnation of the writer, though: a
#   Redis Cluster reshard moves the meta whole to another master, which lost nothing
#   (``_INCARNATION`` tells the cases apart). INFO is read and matched once per script
#   run, whatever the number of events or of calls in a bundle (``APPEND_MANY``); where
#   it is missing (the embedded Redis) the incarnation is unknown and never changes.
# * Each head is an event encoded up to its ``"seq":``; the script completes it, so the
#   log entry and the published bytes are identical. Stream ids are ``0-<seq>``.
# * The call that ends the run may bring the turn's messages (a JSON array) for the
#   session's memory, which keeps whole turns, the last ``turns`` of them.
# * The call that ends the run takes it out of the session's queue and announces it (the
#   run's id) on the runs-ended channel, so the frontend that queued it stops following it
#   at once (a data loss just after the end would otherwise look to it like a run lost
#   unended, api/runs.py) and workers start the session's next run (worker/parking.py).
# * Expiry: the session's log, its meta and the run live ``ttl`` seconds past their last
#   refresh. A refresh comes with any key the call creates, with the call that ends the
#   run, and once a tenth of the ttl has gone by: not with every call, since each EXPIRE
#   is a write that the append-only file and every replica carry (a third of a
#   one-event call's bytes there: ``python -m bench.appends``).
#
# The body is one session's call, a Lua function of its ``KEYS`` and ``ARGV``: ``APPEND``
# runs it once, ``APPEND_MANY`` once per call of a bundle.
_APPEND = """
local state = redis.call('HMGET', KEYS[4], 'fence', 'emitted', 'status')
local emitted = tonumber(state[2] or '0')
if state[1] and state[1] ~= ARGV[4] then
  return -1
end
if state[3] == 'done' or state[3] == 'failed' or state[3] == 'cancelled' then
  if tonumber(ARGV[6]) + #ARGV - 13 <= emitted then
    return tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
  end
  return -1
end
local refresh = ARGV[7] ~= ''
if not state[1] then
  -- the run's state was lost with Redis' data: this attempt carries on and owns it
  redis.call('HSET', KEYS[4], 'fence', ARGV[4], 'status', 'running')
  emitted = 0
  refresh = true
end
local meta = redis.call('HMGET', KEYS[1], 'seq', 'epoch', 'replid', 'replat')
local seq = tonumber(meta[1] or '0')
local epoch = meta[2]
local replid = replication_id()
if not epoch or seq < tonumber(ARGV[5]) or incarnation_lost(replid, meta[3], meta[4]) then
  local t = redis.call('TIME')
  epoch = ARGV[3] .. string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
  seq = 0
  redis.call('DEL', KEYS[2])
  refresh = true
end
local tail = ',"epoch":"' .. epoch .. '"}'
local first = tonumber(ARGV[6])
for i = 13, #ARGV do
  local n = first + i - 13
  if n > emitted then
    seq = seq + 1
    local id = string.format('%d', seq)  -- an integer's digits, not a float's %.14g
    local payload = ARGV[i] .. id .. tail
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '0-' .. id, 'e', payload)
    redis.call('PUBLISH', KEYS[3], payload)
    emitted = n
  end
end
if replid and meta[3] ~= replid then
  redis.call('HSET', KEYS[1], 'seq', seq, 'epoch', epoch, 'replid', replid, 'replat', clock())
else
  redis.call('HSET', KEYS[1], 'seq', seq, 'epoch', epoch)
end
local ttl = tonumber(ARGV[2])
-- TTL is -1 for a log the XADDs above created, -2 for none: both refresh
if refresh or redis.call('TTL', KEYS[2]) < ttl - ttl / 10 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[4], ttl)
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[4], 'status', ARGV[7], 'result', ARGV[8], 'emitted', emitted)
  redis.call('SREM', KEYS[5], ARGV[9])
  redis.call('ZREM', KEYS[7], ARGV[9])
  redis.call('PUBLISH', ARGV[12], ARGV[9])
  if ARGV[10] ~= '' then
    redis.call('RPUSH', KEYS[6], ARGV[10])
    redis.call('LTRIM', KEYS[6], -tonumber(ARGV[11]), -1)
    redis.call('EXPIRE', KEYS[6], ARGV[2])
  end
else
  redis.call('HSET', KEYS[4], 'emitted', emitted)
end
return seq
"""
# Which incarnation of the master holds the session's meta. The meta keeps the id
# (``replid``) of the master that last wrote it and the time (``replat``, the server's
# clock in whole seconds) that id was written; they change together, once per
# incarnation, not with every event. ``incarnation_lost`` tells whether the data under
# a meta written by another id may be behind what clients got, so a new epoch must start:
# * the stored id is this master's ``master_replid2``: it was a replica of the writer,
#   promoted, and replication is asynchronous -> lost;
# * this server started after the id was written: it restarted and loaded from disk what
#   it had saved, which may be behind -> lost;
# * else the server was up before that write and is no promoted replica of the writer:
#   the keys came whole by a slot migration (MIGRATE), nothing is lost, the id is adopted.
# A meta with no time (written before times were kept) is lost on any new id. Slots move
# only on a Redis Cluster: elsewhere (one server, Sentinel) any new id is lost, the third
# case never applies (``SLOTS_MOVE``, set where the script is registered). Limit, on a
# cluster: a replica promoted twice (its ``master_replid2`` is then the id of its own
# first term) is taken for a migration (docs/reliability.md, "Failover").
# The second INFO (``server``) is read only on a new id, not per event.
_INCARNATION = """
local SLOTS_MOVE = false
local replication_read
local function replication(field)
  if replication_read == nil then
    local info = redis.pcall('INFO', 'replication')
    replication_read = type(info) == 'string' and info or false
  end
  return replication_read and string.match(replication_read, field .. ':(%x+)') or false
end
local replid_read
local function replication_id()
  if replid_read == nil then
    replid_read = replication('master_replid')
  end
  return replid_read
end
local function clock()
  return tonumber(redis.call('TIME')[1])
end
local function incarnation_lost(replid, stored, written)
  if not replid or not stored or stored == replid then
    return false
  end
  if not SLOTS_MOVE or not written or stored == replication('master_replid2') then
    return true
  end
  local info = redis.pcall('INFO', 'server')
  local up = type(info) == 'string' and tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
  if not up then
    return true
  end
  -- Redis counts uptime from its start's whole second to the clock's, so this is the
  -- second it started in: a write in that very second reads as older than the start
  -- (a new epoch, the safe side)
  return clock() - up >= tonumber(written)
end
"""

_APPEND_FUNCTION = (
    _INCARNATION
    + """
local function append(KEYS, ARGV)
"""
    + _APPEND
    + "end\n"
)

APPEND = _APPEND_FUNCTION + "return append(KEYS, ARGV)\n"

# A bundle: the calls of many sessions that do not end their runs, in one script run, so
# that what a script run costs Redis besides its commands (parsing it, setting up Lua,
# arguments it would repeat) is paid once per bundle, not once per event
# (docs/performance.md, "Redis per event").
# KEYS: each call's meta, log, channel and run, in the order of the calls. On a cluster,
#       a bundle is of the sessions of one master, whose slots differ, and a script's
#       declared keys must be of one slot: there KEYS is empty, each call's four keys
#       come before its arguments, and the script is declared ``allow-cross-slot-keys``
#       (shared/redis/cluster.py). A key whose slot is not, or no longer, this master's
#       fails its own call ("Script attempted to access a non local key"), at its first
#       read, and the batcher sends that call again alone. No key is declared so that
#       Redis never redirects the bundle whole: an ASK (a slot being moved, a declared
#       key gone ahead) would run it on the slot's new master, where a session's other
#       keys may not have arrived yet, and write them there anew.
# ARGV: maxlen, ttl, epoch seed, runs-ended channel (as ``APPEND``'s), then for each call:
#       (on a cluster, its four keys), its number of heads, fence, min-seq, first-n,
#       heads...
# Returns each call's reply, as ``APPEND`` would give it, in order; a call that fails
# (its commands raise an error) gets that error and the others go on, as if each call
# were a script run of its own. But for ``READONLY`` (the server is a replica now, and
# no call could write): that fails the whole script run, as it fails a script run of
# one call, so the batcher's line drops the connection and the calls are tried again
# on the master (shared/redis/pipeline.py).
APPEND_MANY = (
    _APPEND_FUNCTION
    + """
local replies, k, a = {}, 0, 5
local inline = #KEYS == 0  -- a cluster's bundle: each call's keys among the arguments
while a <= #ARGV do
  local keys
  if inline then
    keys = {ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]}
    a = a + 4
  else
    keys = {KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]}
  end
  local n = tonumber(ARGV[a])
  local ok, reply = pcall(append, keys, {
    ARGV[1], ARGV[2], ARGV[3], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], '', '', '', '', '0',
    ARGV[4], unpack(ARGV, a + 4, a + 3 + n)})
  if not ok and type(reply) ~= 'table' then
    reply = {err = tostring(reply)}
  end
  if not ok and string.find(reply.err or '', '^%-?READONLY') then
    return reply
  end
  replies[#replies + 1] = reply
  k, a = k + 4, a + 4 + n
end
return replies
"""
)

# KEYS: run, session's memory, session's queue.  ARGV: fence, owner, lease-ms,
# max-attempts, ttl.
# Returns {verdict, attempt, turns...}: ``run`` (go, with the session's remembered
# turns), ``cancel`` (write ``cancelled`` and stop), ``dead`` (too many attempts: write
# ``error`` and dead-letter), ``busy`` (another attempt holds a live lease),
# ``finished`` (already ended), ``wait`` (with the earliest run of the session admitted
# before this one that has not ended: the run stays queued until it ends). A run asked
# to cancel does not wait: its ``cancelled`` comes at once.
START = (
    _NOW
    + """
local s = redis.call('HMGET', KEYS[1], 'status', 'lease', 'cancel', 'order')
local status = s[1]
if status == 'done' or status == 'failed' or status == 'cancelled' then
  return {'finished', 0}
end
if status == 'running' and tonumber(s[2] or '0') > now then
  return {'busy', 0}
end
if s[3] ~= '1' and s[4] then
  local before = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. s[4], 'LIMIT', 0, 1)
  if before[1] then
    return {'wait', 0, before[1]}
  end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'fence', ARGV[1], 'owner', ARGV[2],
  'lease', now + tonumber(ARGV[3]), 'emitted', 0)
redis.call('EXPIRE', KEYS[1], ARGV[5])
if s[3] == '1' then
  return {'cancel', attempt}
end
-- Attempts handed back by draining workers did not fail: they do not count.
if attempt - tonumber(redis.call('HGET', KEYS[1], 'handoffs') or '0') > tonumber(ARGV[4]) then
  return {'dead', attempt}
end
local turns = redis.call('LRANGE', KEYS[2], 0, -1)
table.insert(turns, 1, attempt)
table.insert(turns, 1, 'run')
return turns
"""
)

# KEYS: run.  ARGV: fence, lease-ms, ttl.  Returns -1 (the lease is lost), 1 (cancel was
# asked for) or 0.
#
# A run whose state is gone altogether (Redis lost its data: FLUSHALL, an empty restart)
# is re-owned by the attempt that renews, as ``APPEND`` re-owns it: the attempt is alive
# and the only one that can still end the run. Were it told "lost" instead, it would stop
# writing and nobody would ever end the run. A state that exists without this fence
# belongs to another attempt, or was ended by ``END_LOST``.
RENEW = (
    _NOW
    + """
local s = redis.call('HMGET', KEYS[1], 'fence', 'cancel')
if not s[1] and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'status', 'running',
    'lease', now + tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 0
end
if s[1] ~= ARGV[1] then
  return -1
end
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
if s[2] == '1' then
  return 1
end
return 0
"""
)

# KEYS: run, meta, log, channel, session's unfinished runs, session's queue.
# ARGV: maxlen, ttl, epoch seed, fence, terminal-status, result, run, head, runs-ended
# channel.
#
# Ends a run whose state Redis lost while no attempt holds it (it was queued, and the job
# went with the jobs stream; or its worker died too), with one terminal event. It acts
# only when the run's state is missing (returns -1 otherwise), so it can never add a
# second ending to a run an attempt re-owned or ended, and a retry of it writes nothing.
# The state it leaves (the terminal status, and a fence no attempt holds) fences out any
# attempt that comes later. If the session's meta is gone too, or another incarnation of
# the master wrote it, the log starts a new epoch, as ``APPEND`` would: a watcher that held
# events of the lost log gets a ``gap`` (reason ``epoch``) and then this event. The end is
# announced on the runs-ended channel, as ``APPEND`` announces it, so jobs parked behind
# the run start at once.
_END = """
local meta = redis.call('HMGET', KEYS[2], 'seq', 'epoch', 'replid', 'replat')
local seq = tonumber(meta[1] or '0')
local epoch = meta[2]
local replid = replication_id()
if not epoch or incarnation_lost(replid, meta[3], meta[4]) then
  local t = redis.call('TIME')
  epoch = ARGV[3] .. string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
  seq = 0
  redis.call('DEL', KEYS[3])
end
seq = seq + 1
local payload = ARGV[8] .. seq .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '0-' .. seq, 'e', payload)
redis.call('PUBLISH', KEYS[4], payload)
if replid and meta[3] ~= replid then
  redis.call('HSET', KEYS[2], 'seq', seq, 'epoch', epoch, 'replid', replid, 'replat', clock())
else
  redis.call('HSET', KEYS[2], 'seq', seq, 'epoch', epoch)
end
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'result', ARGV[6], 'fence', ARGV[4],
  'attempt', 0, 'emitted', 1)
redis.call('SREM', KEYS[5], ARGV[7])
redis.call('ZREM', KEYS[6], ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[9], ARGV[7])
return seq
"""

END_LOST = (
    _INCARNATION
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
"""
    + _END
)

# KEYS and ARGV: as ``END_LOST``.  Ends, as ``END_LOST`` does, a run that was admitted but
# whose job never reached the jobs stream (queueing it failed for good), so the runs after
# it in its session's queue do not wait for it forever. It acts only while the run is
# still ``queued`` and no attempt ever started it (returns -1 otherwise): a run whose job
# did reach the stream after all and started is left to its attempt, and a job that
# reaches the stream after this finds its run ended (``START``: ``finished``) and is let go.
WITHDRAW = (
    _INCARNATION
    + """
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if s[1] ~= 'queued' or (s[2] or '0') ~= '0' then
  return -1
end
"""
    + _END
)

# KEYS: run.  ARGV: fence.  Gives the lease up at once (a draining worker), so the
# next worker to take the job does not wait for it to lapse.
RELEASE = """
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease', 0)
redis.call('HINCRBY', KEYS[1], 'handoffs', 1)
return 1
"""

# KEYS: a user's idempotency key, the key of its prompt's digest (in the same slot).
# ARGV: the key's value (run and session), the digest's value (run and digest), ttl.
# Takes the key for a prompt if it is free, and keeps what prompt it was taken for beside
# it; either way returns {taken (1 or 0), the key's value, the digest's value}. The key's
# value keeps the form every version reads; the digest names its run, so one outliving
# its key (freed by a version that knew no digest) is never taken for another run's.
TAKE_KEY = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
  return {1, ARGV[1], ARGV[2]}
end
return {0, redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
"""

# KEYS: run, session's unfinished runs (a set), session's queue, session's arrivals.
# ARGV: run id, multitask (reject, enqueue, interrupt), ttl, created (Unix ms), user
#       whose run slot it holds ('' for none: whoever ends it unqueued gives that back).
# Admits a run to its session, atomically with every other prompt for it, from any
# frontend: ``reject`` refuses it while the session has an unfinished run (returns
# {'busy', that run}); otherwise the run gets the next arrival order number, its queued
# record and its place in the queue, and {'admitted', order, earlier runs...} comes back:
# the unfinished runs admitted before it, which ``interrupt`` then cancels (``CANCEL``).
# A retry of an admission that already happened changes nothing and returns the same.
ADMIT = """
local order = redis.call('HGET', KEYS[1], 'order')
if not order then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0)
  if ARGV[2] == 'reject' and first[1] then
    return {'busy', first[1]}
  end
  order = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  redis.call('HSETNX', KEYS[1], 'status', 'queued')
  redis.call('HSETNX', KEYS[1], 'attempt', 0)
  redis.call('HSETNX', KEYS[1], 'created', ARGV[4])
  if ARGV[5] and ARGV[5] ~= '' then
    redis.call('HSETNX', KEYS[1], 'user', ARGV[5])
  end
  redis.call('HSET', KEYS[1], 'order', order)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[3], order, ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
local earlier = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. order)
table.insert(earlier, 1, order)
table.insert(earlier, 1, 'admitted')
return earlier
"""

# KEYS: session's queue, a run.  ARGV: the run's id.  Takes a run out of its session's
# queue if it has ended or its state is gone (Redis lost it and nobody ended it), so the
# runs after it are not held up forever; returns 1 if it did.
DEQUEUE = """
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'queued' or status == 'running' then
  return 0
end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# KEYS: run.  Marks an unfinished run for cancellation; returns its status (or false).
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1)
end
return status
"""

# KEYS: run, run's approval.  ARGV: fence, ttl, field, value, field, value...
# Keeps what a run waiting for an approval needs to go on (worker/approvals.py), if
# ``fence`` still holds the run; returns 0 otherwise. A decision taken already stays.
AWAIT_APPROVAL = """
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return 0
end
for i = 3, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: run, run's approval.  ARGV: call_id, decision, reason (JSON), by.
# Decides the call waiting for an approval, once: returns 1, or 0 when the run is not
# waiting on that call (unknown, ended, cancelled, or decided already, by a person or
# the timeout), so two answers racing each other never both count.
DECIDE = """
local s = redis.call('HMGET', KEYS[1], 'status', 'cancel')
if s[1] ~= 'running' or s[2] == '1' then
  return 0
end
local w = redis.call('HMGET', KEYS[2], 'call_id', 'decision')
if w[1] ~= ARGV[1] or w[2] then
  return 0
end
redis.call('HSET', KEYS[2], 'decision', ARGV[2], 'reason', ARGV[3], 'by', ARGV[4])
return 1
"""

# KEYS: a sorted set of held slots.  ARGV: member, lifetime-ms, limit.
# Slots expire by themselves (a frontend or worker that died frees its slots in time);
# holders refresh them. Expiry is on Redis' clock: a holder whose clock is ahead of
# another's by more than a slot's life would otherwise drop the other's live slots.
# Returns {1 if the member holds a slot, 0 if the limit is reached; Redis' time in ms}.
ACQUIRE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return {0, now}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, now}
"""
)

# KEYS: this window's counter, the previous window's.  ARGV: window seconds.  Counts one
# more and returns {this window's count, the previous window's}; the caller adds the share
# of the previous one still inside its sliding window, so a burst that straddles a window
# boundary is still seen whole, and knows from the two when there can be room again.
COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('EXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
end
return {n, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

# KEYS: a session's owner.  ARGV: user, ttl.  The first user to use a session owns it.
CLAIM = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return owner
"""

# KEYS: a user's token counters, one per budget window (one hash slot: the user's digest).
# ARGV: tokens, then each counter's lifetime in seconds, in the order of KEYS.
# Adds the tokens to every counter and returns the counts after, in the order of KEYS. A
# counter lives a little past its window, and its expiry is set once, when the charge
# creates it: a window's count never outlives the window, however often it is charged.
CHARGE = """
local used = {}
for i, key in ipairs(KEYS) do
  used[i] = redis.call('INCRBY', key, ARGV[1])
  if redis.call('TTL', key) < 0 then
    redis.call('EXPIRE', key, ARGV[i + 1])
  end
end
return used
"""

# KEYS: a user's token counters, one per budget window (one hash slot: the user's digest).
# ARGV: need, want (>= 1), then each counter's limit (0: none) and lifetime in seconds.
# A reservation: grants ``want`` tokens, or what remains under every limit if less, and
# nothing once nothing remains. When what remains is less than ``need`` (the thought that
# asked), the grant takes it all and the thought goes ``over`` the limit, charged here with
# it: after that nothing remains, so the counts stay under a limit plus one thought
# however many runs reserve at once. Returns {granted, over}.
RESERVE = """
local need, want = tonumber(ARGV[1]), tonumber(ARGV[2])
local granted = want
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 * i + 1])
  if limit > 0 then
    granted = math.min(granted, limit - tonumber(redis.call('GET', key) or '0'))
  end
end
if granted <= 0 then
  return {0, 0}
end
local over = math.max(0, need - granted)
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, granted + over)
  if redis.call('TTL', key) < 0 then
    redis.call('EXPIRE', key, ARGV[2 * i + 2])
  end
end
return {granted, over}
"""

# KEYS: a user's token counters, one per budget window.  ARGV: tokens.
# Gives back a reservation's unused tokens: takes them from each counter that still
# exists, never below 0 (a window that is over has nothing to give back to).
GIVE_BACK = """
for _, key in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', key) or '0')
  if n > 0 then
    redis.call('DECRBY', key, math.min(n, tonumber(ARGV[1])))
  end
end
return 0
"""

# KEYS: the session's presence hash, its expiry sorted set, its presence channel.
# ARGV: frontend id ('' only reads: no entry written, no time to live touched), what it
#       holds (JSON {user: sockets}; '' holds none), ttl ms, interval ms, names cap,
#       session, publish (1/0).
# Writes the frontend's entry, drops the entries of frontends that stopped refreshing,
# and sums what is left: sockets, distinct users, the first names in order. The frame
# is published only when it differs from the last one published, and at most once an
# interval; a change that must wait returns when it is due (Unix ms), for the caller
# to call again then. Returns {sockets, users, frame, due or 0, earliest lapse or 0, now,
# published (1/0)}.
PRESENCE = (
    _NOW
    + """
local node, held = ARGV[1], ARGV[2]
local ttl, interval, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if node ~= '' then
  if held == '' then
    redis.call('HDEL', KEYS[1], node)
    redis.call('ZREM', KEYS[2], node)
  else
    redis.call('HSET', KEYS[1], node, held)
    redis.call('ZADD', KEYS[2], now + ttl, node)
  end
end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local live = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local sockets, users, names, seen = 0, 0, {}, {}
for i = 1, #live, 2 do
  local entry = redis.call('HGET', KEYS[1], live[i])
  if entry then
    for user, n in pairs(cjson.decode(entry)) do
      sockets = sockets + n
      if not seen[user] then
        seen[user] = true
        users = users + 1
        names[users] = user
      end
    end
  end
end
table.sort(names)
local first = {}
for i = 1, math.min(cap, users) do
  first[i] = cjson.encode(names[i])
end
local frame = '{"type":"presence","session":' .. cjson.encode(ARGV[6])
  .. ',"sockets":' .. string.format('%d', sockets)
  .. ',"users":' .. string.format('%d', users)
  .. ',"names":[' .. table.concat(first, ',') .. ']}'
local due, published = 0, 0
if ARGV[7] == '1' and redis.call('HGET', KEYS[1], ':sent') ~= frame then
  due = tonumber(redis.call('HGET', KEYS[1], ':at') or '0') + interval
  if now >= due then
    redis.call('PUBLISH', KEYS[3], frame)
    redis.call('HSET', KEYS[1], ':sent', frame, ':at', now)
    due, published = 0, 1
  end
end
if node ~= '' then
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  redis.call('PEXPIRE', KEYS[2], 2 * ttl)
end
local lapse = 0
if #live > 0 then
  lapse = tonumber(live[2])
end
return {sockets, users, frame, due, lapse, now, published}
"""
)

# KEYS: session's snapshot, session's meta. ARGV: epoch, seq, state (JSON), ttl.
# A snapshot only moves forward, and only within the log's current epoch: one of an
# older epoch, or at a seq the stored one has reached, is refused (0). Two writers at
# one seq fold the same log, so which of them lands does not matter.
SAVE_SNAPSHOT = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then return 0 end
local stored = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if stored[1] == ARGV[1] and tonumber(stored[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'seq', ARGV[2], 'state', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
