"""The task queue's atomic steps as Lua scripts (layout: ``rlhf.tasks``), and the
task-checked submit that serving's Feedback service runs for a Comparison with a task_id.

Each script runs alone in Redis, so two labelers asking at once never get the same slot and
a ranking is stored, its task marked done and the lease dropped in one step. The scripts
derive per-task key names from the prefix and the ids (one Redis instance, not a cluster).
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf.comparisons import GROUP, ID_INDEX, STREAM, encode_entry
from rlhf.v1.feedback_pb2 import Comparison

# Shared by lease and submit: may labeler `who` take a slot of task `id` at `now`? Not if
# they ranked or skipped it; a golden task (wanted 0) has a slot for everyone; else stored
# rankings + other labelers' unexpired leases must leave a slot of `wanted`.
_FREE = """
local function free(P, id, who, now)
  local T = P .. 'task:' .. id
  if redis.call('SISMEMBER', T .. ':done', who) == 1 then return false end
  if redis.call('SISMEMBER', T .. ':skipped', who) == 1 then return false end
  local wanted = tonumber(redis.call('HGET', T, 'wanted') or '-1')
  if wanted == 0 then return true end
  if wanted < 0 then return false end
  local busy = redis.call('SCARD', T .. ':done')
  local leases = redis.call('HGETALL', T .. ':leases')
  for i = 1, #leases, 2 do
    if leases[i] ~= who and tonumber(leases[i + 1]) > now then busy = busy + 1 end
  end
  return busy < wanted
end
"""

# ARGV: prefix, labeler, now ms, lease ms, golden wanted ("1"/"0"). Returns a task id or
# false. The labeler's held task comes back (a reopened tab) while it is still theirs to
# take; then a golden task (when asked for), then the oldest open task with a free slot.
LEASE_LUA = _FREE + """
local P, who, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local function take(id)
  redis.call('HSET', P .. 'task:' .. id .. ':leases', who, now + ttl)
  redis.call('SET', P .. 'lease:' .. who, id)
  return id
end
local held = redis.call('GET', P .. 'lease:' .. who)
if held and free(P, held, who, now) then return take(held) end
-- Oldest first, 100 ids a page: the scan stops at the first free slot (in steady state
-- past the tasks other labelers hold), never reading the whole queue for nothing.
local function first_free(key)
  local start = 0
  while true do
    local ids = redis.call('ZRANGE', key, start, start + 99)
    for _, id in ipairs(ids) do
      if free(P, id, who, now) then return id end
    end
    if #ids < 100 then return nil end
    start = start + 100
  end
end
local id = ARGV[5] == '1' and first_free(P .. 'golden') or nil
id = id or first_free(P .. 'open')
if id then return take(id) end
return false
"""

# KEYS[1]: the task hash. ARGV[1]: candidates JSON. Sets them unless set; returns them
# (nil when the task does not exist).
FREEZE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local have = redis.call('HGET', KEYS[1], 'candidates')
if not have or have == '' then
  redis.call('HSET', KEYS[1], 'candidates', ARGV[1])
  return ARGV[1]
end
return have
"""

# The Feedback service's submit of a ranking for a task. KEYS: id index, stream. ARGV:
# record id, group, prefix, task id, labeler, now ms, then the entry's field/value pairs.
# Returns {1, entry} (a retry: stored before), {0, entry} (stored now) or {-1, reason}:
# "unknown" task, "done" (this labeler ranked it), "not_leased" (never leased to them),
# "taken" (their lease expired and the slot went to others).
SUBMIT_LUA = _FREE + """
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if seen then return {1, seen} end
local P, id, who, now = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local T = P .. 'task:' .. id
if redis.call('EXISTS', T) == 0 then return {-1, 'unknown'} end
if redis.call('SISMEMBER', T .. ':done', who) == 1 then return {-1, 'done'} end
local lease = redis.call('HGET', T .. ':leases', who)
if not lease then return {-1, 'not_leased'} end
if tonumber(lease) <= now and not free(P, id, who, now) then return {-1, 'taken'} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
end
local entry = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 7))
redis.call('HSET', KEYS[1], ARGV[1], entry)
redis.call('SADD', T .. ':done', who)
redis.call('HDEL', T .. ':leases', who)
if redis.call('GET', P .. 'lease:' .. who) == id then redis.call('DEL', P .. 'lease:' .. who) end
local wanted = tonumber(redis.call('HGET', T, 'wanted'))
if wanted > 0 and redis.call('SCARD', T .. ':done') >= wanted then
  redis.call('ZREM', P .. 'open', id)
end
return {0, entry}
"""

REASONS = {
    "unknown": ("FAILED_PRECONDITION", "is not a queued task"),
    "done": ("FAILED_PRECONDITION", "was ranked by this labeler already (a task is ranked "
             "once per labeler); take the next task"),
    "not_leased": ("PERMISSION_DENIED", "is not leased to this labeler: take it with "
                   "'Next task' first"),
    "taken": ("FAILED_PRECONDITION", "lease expired and the task went to other labelers; "
              "take the next task"),
}


def submit_call(record: Comparison, prefix: str, now_ms: int, stream: str = STREAM,
                id_index: str = ID_INDEX, group: str = GROUP
                ) -> tuple[list[str], list[str | bytes]]:
    """``(keys, args)`` of ``SUBMIT_LUA`` for ``record`` (task_id, labeler, received_at set)."""
    fields = [part for pair in encode_entry(record).items() for part in pair]
    return [id_index, stream], [record.id, group, prefix, record.task_id, record.labeler_id,
                                str(now_ms), *fields]


def parse_reply(reply: Sequence) -> tuple[int, str]:
    """``(status, entry id or reason)``: 1 duplicate, 0 stored, -1 refused."""
    status, value = reply
    return int(status), value.decode() if isinstance(value, bytes) else str(value)
