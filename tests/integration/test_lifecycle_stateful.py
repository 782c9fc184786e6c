"""The lifecycle Lua scripts, driven in random interleavings against a pure-Python model of one queue.

A Hypothesis state machine calls add / claim / renew / complete / fail / retry / release / recover /
retry_failed / watch through the broker's typed functions, ``qflow._broker.scripts`` (EVALSHA with its EVAL
fallback, which ``SCRIPT FLUSH`` steps exercise) on the real key names of ``QueueKeys``, and after every
step compares the queue's whole Redis state, read in one MULTI, with the model.

It also holds the scripts to the lifecycle table the docs draw, ``qflow._state.TRANSITIONS``: every change
of a job's stored state between two steps must be a row of the script that ran (or a chain of its rows within
one call, as claim's delayed -> waiting -> active). The other direction is checked statically: each script
writes exactly the states its rows lead to (tests/unit/test_state.py reads them from the Lua text). Asserting
that one run saw every row would be flaky: some rows turn up in only about one example in ten.

Time is made deterministic without sleeping: a lease is valid only while its deadline is later than the
server clock, so a 0 ms lease (from claim or renew) is expired as soon as it is granted, while a 60 s lease
or a 10 min delay never runs out during a run. One rule, ``time_passes``, stands for the clock moving on for
one job: it moves that job's lease deadline or due time into the past, as the server clock would.

Expired deadlines and due times are then rewritten to small distinct past scores ("ticks"), so the order in
which recover and claim pick them up does not depend on which millisecond a call ran in: Hypothesis needs
every run of a step sequence to behave the same, or it cannot replay and shrink a failure. Failure times get
ticks too (after a check that the script stored its server time), so "oldest failures first" is exact.

Completion times are pinned to ticks the same way, so retention is exact too: each run keeps 1, 2, 3 or
all finished jobs of each kind, and the model trims what complete, fail and recover must trim in the same
call (the oldest beyond the count; jobs finished by that very call, which share its server time, by id).
A trimmed job is gone from every hash, its id free for a new job.

Result waiters (``watch``, and the notify list complete and fail push to) are modelled by what a waiter
sees: the state and outcome ``watch`` returns; a wake-up pushed once a job it waits for is completed or
failed; and an empty notify list whenever it starts waiting on an unfinished job (a notification left by
an earlier life of the id, before retry_failed or before trimming and a new add, would wake it at once and
make it spin). Corrupt fields: a waiting job whose stored ``attempts`` or ``stalls`` is not a count fails
at claim, alone, with a reason naming the field; the rest of its batch is leased.

Acks sent again: complete and fail keep the token of the delivery that finished a job (until retention
trims it, or the id's next claim replaces it), so an ack resent by that delivery after its reply was lost is
answered as recorded, writing and counting nothing; any other stale ack is rejected and counted as before.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from qflow import _codec
from qflow._broker import scripts
from qflow._broker.keys import SCHEMA_VERSION, QueueKeys
from qflow._state import TRANSITIONS

T = TypeVar("T")

QUEUE = "lifecycle"
LONG_MS = 60_000  # a lease that outlives any run by far
LATER_MS = 600_000  # a delay that keeps a job delayed for the whole run
KEEP = 100_000  # retention larger than anything a run creates: nothing is trimmed
KEEPS = st.sampled_from([1, 1, 2, 3, KEEP])  # finished jobs a run keeps (completed and failed drawn apart)
CORRUPT = st.sampled_from(["garbage", "-1", ""])  # stored counters no script can add to or pack
NOTIFY_TTL_MS = 60_000
PROMOTE_LIMIT = 1000
RECOVER_LIMIT = 1000
WORKERS = (0, 1)
LEASES = st.sampled_from([LONG_MS, LONG_MS, 0])  # mostly long: most rules need a live lease to act on
BOGUS_TOKENS = ("0", "-1", "not-a-token")  # tokens come from INCRBY on `seq`, so they start at "1"


def claimed(reply: scripts.ClaimReply) -> list[tuple[str, str, str, int, int]]:
    """(id, token, envelope, attempts, stalls) of each job a claim leased, as text."""
    return [(j.id.decode(), j.token.decode(), j.envelope.decode(), j.attempts, j.stalls) for j in reply.jobs]


def explained(before: str | None, after: str | None, scripts: list[str]) -> bool:
    """Whether TRANSITIONS rows of `scripts`, run in this order, take a stored state from `before` to `after`.

    None is no state (a job not created yet). Each script call may move the job along any chain of its own
    rows (claim: delayed -> waiting -> active), or leave it where it was. States are compared as the strings
    Redis stores (``State`` is a ``StrEnum``).
    """
    reach: set[str | None] = {before}
    for name in scripts:
        moves = [(src, dst) for src, dst, script_name, _ in TRANSITIONS if script_name == name]
        frontier = list(reach)
        while frontier:
            at = frontier.pop()
            for src, dst in moves:
                if src == at and dst not in reach:
                    reach.add(dst)
                    frontier.append(dst)
    return after in reach


def show_rows(scripts: list[str]) -> str:
    """The TRANSITIONS rows of these scripts, for a failure message."""
    rows = [f"{src or '(new)'} -> {dst} ({name})" for src, dst, name, _ in TRANSITIONS if name in scripts]
    return "; ".join(rows) or "none"


@dataclass
class Lease:
    """The current delivery of an active job, as the server holds it."""

    token: str
    expired_at: int = 0  # the tick its deadline was set to once it expired; 0 while the lease is live

    @property
    def expired(self) -> bool:
        return self.expired_at != 0


@dataclass(frozen=True)
class Held:
    """A delivery some worker holds (and may ack long after it stopped being current)."""

    worker: int
    id: str
    token: str


class LifecycleMachine(RuleBasedStateMachine):
    """One queue under a fresh key prefix, its scripts, and the model they must agree with."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.k = QueueKeys(f"qflowtest-{uuid.uuid4().hex[:12]}", QUEUE)
        # Text; a script's msgpack error for a corrupt job is kept as surrogates and compared as it is.
        self.sync = redis.Redis.from_url(
            url, decode_responses=True, encoding_errors="surrogateescape", socket_timeout=10
        )
        self.runner = asyncio.Runner()
        # Scripts get a bytes client, as in qflow (claim's reply is binary); state is read as text.
        self.client = aioredis.Redis.from_url(url, socket_timeout=10)
        secs, micros = self.sync.time()
        server_now = secs * 1000 + micros // 1000
        self.past_ms = server_now - LONG_MS
        self.future_ms = server_now + LATER_MS
        # The model.
        self.envelopes: dict[str, str] = {}  # every job `add` acknowledged, with the envelope it kept
        self.wait: list[str] = []  # as LRANGE 0 -1 shows it: LPUSH inserts at 0, RPOP takes the end
        self.delayed: dict[str, int] = {}  # id -> 0 while not due, else the tick it became due at
        self.active: dict[str, Lease] = {}
        self.completed: dict[str, int] = {}  # id -> the tick its completion time was pinned to (`pin`)
        self.failed: dict[str, int] = {}  # id -> the tick its failure time was pinned to (see `pin`)
        self.attempts: Counter[str] = Counter()
        self.stalls: Counter[str] = Counter()
        self.results: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.stats: Counter[str] = Counter()
        self.issued: dict[str, list[str]] = {}  # id -> tokens of all its deliveries so far
        # id -> the token complete or fail kept for a job not active: of the delivery that finished it (the
        # id's next claim replaces it, retention trims it). That delivery's resent ack is recorded, not stale.
        self.kept: dict[str, str] = {}
        self.held: list[Held] = []
        self.finished: dict[str, tuple[Any, ...]] = {}  # a finished job as first seen; must never change
        self.next_id = 0
        self.keep_completed = KEEP
        self.keep_failed = KEEP
        self.trimmed: set[str] = set()  # ids retention trimmed (free again, unless added since)
        self.just_trimmed: set[str] = set()  # since the last lifecycle check: their state went, by no row
        self.corrupt: dict[str, dict[str, str | None]] = {}  # id -> stored attempts/stalls that are no count
        # Result waiters. `registered`: watched while unfinished, and not finished since; a script that
        # finishes one must leave a wake-up. `maybe_registered`: registered before claim or recover failed the
        # job (neither notifies) or retry_failed requeued it: a script may or may not have dropped the entry.
        self.registered: set[str] = set()
        self.maybe_registered: set[str] = set()
        self.notified: set[str] = set()  # ids with a notify list (complete/fail woke a waiter)
        # What the lifecycle check needs: the scripts called since the last check, and each job's stored
        # state at that check.
        self.ran: list[str] = []
        self.seen: dict[str, str] = {}
        self.serial = 0
        self.max_stalls = 2
        self.tick = 0

    def teardown(self) -> None:
        try:
            self.runner.run(self.client.aclose())
            self.runner.close()
            keys = [*self.k.all_fixed(), *self.sync.scan_iter(match=self.k.notify("*"), count=1000)]
            self.sync.delete(*keys)
        finally:
            self.sync.close()

    # -- helpers ---------------------------------------------------------------------------------------

    def call(self, name: str, call: Awaitable[T]) -> T:
        """Run one broker call of script ``name`` (recorded for the lifecycle check)."""
        if not self.ran or self.ran[-1] != name:  # calls in a row of one script chain the same rows
            self.ran.append(name)

        async def run() -> T:
            return await call

        return self.runner.run(run())

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def current(self, job_id: str, token: str) -> bool:
        """Whether an ack with this token must be accepted: the job is active under it, lease unexpired."""
        lease = self.active.get(job_id)
        return lease is not None and lease.token == token and not lease.expired

    def stale_pairs(self) -> list[tuple[str, str]]:
        return [(i, t) for i, ts in sorted(self.issued.items()) for t in ts if not self.current(i, t)]

    def recorded(self, job_id: str, token: str, outcome: Literal["completed", "failed"]) -> bool:
        """Whether an ack of this outcome is a resend of the one that finished the job: its token is the one
        kept, and the job is in that state (before this call's own writes)."""
        return self.kept.get(job_id) == token and job_id in getattr(self, outcome)

    def recorded_pairs(self, outcome: Literal["completed", "failed"]) -> list[tuple[str, str]]:
        return [(i, t) for i, t in sorted(self.kept.items()) if self.recorded(i, t, outcome)]

    def location(self, job_id: str) -> str:
        if job_id in self.active:
            return "active"
        if job_id in self.delayed:
            return "delayed"
        if job_id in self.completed:
            return "completed"
        if job_id in self.failed:
            return "failed"
        assert job_id in self.wait
        return "waiting"

    def snapshot(self) -> dict[str, Any]:
        """The queue's whole state, read atomically (MULTI/EXEC), with the server time of the read."""
        k = self.k
        names = ["now", "wait", "delayed", "active", "completed", "failed"]
        hashes = ["jobs", "state", "tokens", "attempts", "stalls", "results", "errors", "waiters", "stats"]
        with self.sync.pipeline(transaction=True) as p:
            p.time()
            p.lrange(k.wait, 0, -1)
            for zset in (k.delayed, k.active, k.completed, k.failed):
                p.zrange(zset, 0, -1, withscores=True)
            for h in hashes:
                p.hgetall(getattr(k, h))
            p.get(k.seq)
            p.hgetall(k.meta)
            replies = p.execute()
        snap = dict(zip([*names, *hashes, "seq", "meta"], replies, strict=True))
        secs, micros = snap["now"]
        snap["now"] = secs * 1000 + micros // 1000
        for zset in ("delayed", "active", "completed", "failed"):
            snap[zset] = dict(snap[zset])
        return snap

    def without_time(self, snap: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in snap.items() if name != "now"}

    def live(self) -> list[tuple[str, str]]:
        """The current deliveries some live worker holds: the ones whose acks must be accepted."""
        return [(h.id, h.token) for h in self.held if self.current(h.id, h.token)]

    def draw_deliveries(self, data: st.DataObject, max_size: int) -> list[tuple[str, str]]:
        """1 to `max_size` current deliveries; in a batch, maybe one stale one among them too."""
        pairs = data.draw(
            st.lists(st.sampled_from(self.live()), min_size=1, max_size=max_size), label="deliveries"
        )
        stale = self.stale_pairs()
        if max_size > 1 and stale:
            late = data.draw(st.lists(st.sampled_from(stale), max_size=1), label="stale one")
            at = data.draw(st.integers(0, len(pairs)), label="at")
            pairs[at:at] = late
        return pairs

    def expire(self, job_ids: list[str]) -> None:
        """Leases just granted or renewed for 0 ms: check they expired, then pin their deadline to a tick."""
        if not job_ids:
            return
        with self.sync.pipeline(transaction=True) as p:
            p.time()
            for job_id in job_ids:
                p.zscore(self.k.active, job_id)
            (secs, micros), *deadlines = p.execute()
        assert all(d <= secs * 1000 + micros // 1000 for d in deadlines), "a 0 ms lease is still valid"
        self.tick += 1
        assert self.sync.zadd(self.k.active, dict.fromkeys(job_ids, self.tick), xx=True) == 0
        for job_id in job_ids:
            self.active[job_id].expired_at = self.tick

    def pin(self, finished: Literal["completed", "failed"], job_ids: list[str]) -> None:
        """Jobs one script call just finished (and kept): check it stored the server time, then pin that to
        ticks, in id order (the order of equal scores), so the next trim and "oldest first" are exact."""
        if not job_ids:
            return
        key = getattr(self.k, finished)
        model: dict[str, int] = getattr(self, finished)
        with self.sync.pipeline(transaction=True) as p:
            p.time()
            for job_id in job_ids:
                p.zscore(key, job_id)
            (secs, micros), *scores = p.execute()
        assert len(set(scores)) == 1, f"one script call stored different {finished} times"
        assert self.past_ms < scores[0] <= secs * 1000 + micros // 1000, (
            f"{finished} time is not the server's"
        )
        for job_id in sorted(job_ids):
            self.tick += 1
            model[job_id] = self.tick
        assert self.sync.zadd(key, {i: model[i] for i in job_ids}, xx=True) == 0

    def finish(
        self, finished: Literal["completed", "failed"], new: list[str], *, tokens: bool = True
    ) -> None:
        """`new` just entered a finished set in one script call, which then trimmed the set to its keep count:
        the oldest go (pinned ticks first, then the call's own jobs, which share its time, by id). A call
        that finished nothing trims nothing. ``tokens``: the call's trim deletes the trimmed jobs' tokens."""
        if not new:
            return
        model: dict[str, int] = getattr(self, finished)
        keep = self.keep_completed if finished == "completed" else self.keep_failed
        order = [i for _, i in sorted((t, i) for i, t in model.items())] + sorted(new)
        victims = order[: max(0, len(order) - keep)]
        self.forget(victims, tokens=tokens)
        self.pin(finished, [i for i in new if i not in victims])

    def forget(self, job_ids: list[str], *, tokens: bool = True) -> None:
        """Retention trimmed these finished jobs: every field of theirs is gone (the kept token too, if the
        trim deletes ``tokens``), their ids free again."""
        for job_id in job_ids:
            del self.envelopes[job_id]
            if tokens:
                self.kept.pop(job_id, None)
            self.completed.pop(job_id, None)
            self.failed.pop(job_id, None)
            self.results.pop(job_id, None)
            self.errors.pop(job_id, None)
            del self.attempts[job_id]
            del self.stalls[job_id]
            self.corrupt.pop(job_id, None)
            self.finished.pop(job_id, None)
            self.registered.discard(job_id)
            self.maybe_registered.discard(job_id)
            self.trimmed.add(job_id)
            self.just_trimmed.add(job_id)

    def woken(self, state: str, job_ids: list[str]) -> None:
        """These jobs were just completed or failed by complete/fail: each registered waiter's notify list
        now starts with the state (its blocking wait ends at once), and lives at most the notify TTL."""
        for job_id in job_ids:
            if job_id in self.registered:
                key = self.k.notify(job_id)
                assert self.sync.lindex(key, 0) == state, f"the waiter on {job_id} was not woken"
                assert 0 < self.sync.pttl(key) <= NOTIFY_TTL_MS, f"notify list of {job_id} without a TTL"
                self.notified.add(job_id)
            elif job_id in self.maybe_registered and self.sync.exists(self.k.notify(job_id)):
                self.notified.add(job_id)
            self.registered.discard(job_id)
            self.maybe_registered.discard(job_id)

    def drop_held(self, pairs: list[tuple[str, str]]) -> None:
        """A worker forgets a delivery once it acked it, whatever the answer was."""
        self.held = [h for h in self.held if (h.id, h.token) not in pairs]

    # -- producer --------------------------------------------------------------------------------------

    @initialize(data=st.data())
    def backlog(self, data: st.DataObject) -> None:
        """Start with 2-8 waiting jobs, so runs where Hypothesis leaves `add` out still have work to do."""
        self.add_jobs(data, data.draw(st.integers(2, 8), label="n"), ["now"])

    # Hypothesis sorts rules by their number of arguments, then by name, and leans towards the first ones.
    # `add` and `claim` feed every other rule, so they take a single argument and draw the rest inside.
    @rule(data=st.data())
    def add(self, data: st.DataObject) -> None:
        """Add 1-3 jobs: now, delayed, with a past or future run_at, reusing an existing id, or the id of a
        job retention trimmed (a new job: the id is free again)."""
        modes = ["now", "delay", "run_at_past", "run_at_future"]
        self.add_jobs(data, data.draw(st.integers(1, 3), label="n"), modes)

    def add_jobs(self, data: st.DataObject, n: int, modes: list[str]) -> None:
        jobs = []
        expected = []
        for _ in range(n):
            freed = sorted(self.trimmed - set(self.envelopes))
            extra = ["duplicate"] if self.envelopes else []
            extra += ["trimmed id"] if freed else []
            mode = data.draw(st.sampled_from([*modes, *extra]), label="mode")
            if mode == "duplicate":
                job_id = data.draw(st.sampled_from(sorted(self.envelopes)), label="existing id")
            elif mode == "trimmed id":
                job_id = data.draw(st.sampled_from(freed), label="trimmed id")
                mode = "now"
            else:
                job_id = f"j{self.next_id}"
                self.next_id += 1
            # Sizes vary (padding) so that a claim's largest-envelope limit can fail some jobs and not others.
            pad = data.draw(st.sampled_from([0, 0, 40]), label="padding")
            envelope = f"env-{job_id}-{self.next_serial()}" + "." * pad
            delay = LATER_MS if mode == "delay" else 0
            run_at = {"run_at_past": self.past_ms, "run_at_future": self.future_ms}.get(mode, 0)
            jobs.append(scripts.NewJob(job_id, envelope, delay, run_at))
            if job_id in self.envelopes:
                expected.append(False)  # idempotent job_id: the first job keeps the id, unchanged
                continue
            expected.append(True)
            self.envelopes[job_id] = envelope
            if mode in ("delay", "run_at_future"):
                self.delayed[job_id] = 0
            else:
                self.wait.insert(0, job_id)
        assert self.call("add", scripts.add(self.client, self.k, jobs)) == expected

    # -- worker side -----------------------------------------------------------------------------------

    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        """Promote due delayed jobs, then take up to `count` waiting jobs under a long or a 0 ms lease.

        Sometimes with a largest accepted envelope (ARGV[4]) that some taken jobs exceed: those fail at claim.
        A taken job with a corrupt counter fails at claim too, alone, with a reason naming the field.
        """
        count = data.draw(st.integers(1, 3), label="count")
        lease = data.draw(LEASES, label="lease ms")
        worker = data.draw(st.sampled_from(WORKERS), label="worker")
        for _, job_id in sorted((order, i) for i, order in self.delayed.items() if order):
            del self.delayed[job_id]
            self.wait.insert(0, job_id)
        taken = [self.wait.pop() for _ in range(min(count, len(self.wait)))]
        # Just under a taken job's size (it and every larger one fail), or exactly the largest (none fails).
        sizes = sorted({len(self.envelopes[i]) for i in taken})
        limits = [n - 1 for n in sizes] + sizes[-1:]
        largest = data.draw(st.sampled_from([None, None, *limits]), label="largest envelope")
        over: list[str] = []
        error = ""
        if largest is not None:
            error = f"err-too-large-{self.next_serial()}"
            over = [i for i in taken if len(self.envelopes[i]) > largest]
            for job_id in over:
                self.errors[job_id] = error  # no lease, no token, no attempt spent
                self.stats["failed"] += 1
        broken = [i for i in taken if i in self.corrupt and i not in over]
        self.stats["failed"] += len(broken)
        res = self.call(
            "claim",
            scripts.claim(
                self.client,
                self.k,
                count=count,
                lease_ms=lease,
                promote_limit=PROMOTE_LIMIT,
                max_envelope=largest,
                too_large=error.encode(),
            ),
        )
        self.failed_at_claim(broken)
        self.pin("failed", over + broken)  # claim does not trim (it is given no retention)
        self.maybe_registered |= self.registered & {*over, *broken}  # claim wakes no waiter
        self.registered -= {*over, *broken}
        leased = [i for i in taken if i not in over and i not in broken]
        assert res.waiting == len(self.wait)
        if self.delayed:
            assert 0 < res.next_due_ms <= LATER_MS
        else:
            assert res.next_due_ms == -1
        groups = claimed(res)
        assert [g[0] for g in groups] == leased
        seen = {t for ts in self.issued.values() for t in ts}
        tokens = [g[1] for g in groups]
        assert len(set(tokens)) == len(tokens)
        assert not seen & set(tokens), "a fencing token was handed out twice"
        for job_id, token, envelope, attempts, stalls in groups:
            assert envelope == self.envelopes[job_id]
            assert (attempts, stalls) == (self.attempts[job_id], self.stalls[job_id])
            self.active[job_id] = Lease(token)
            self.kept.pop(job_id, None)  # HSET tokens: the new delivery's token replaces a kept one
            self.issued.setdefault(job_id, []).append(token)
            self.held.append(Held(worker, job_id, token))
        if lease == 0:
            self.expire(leased)

    def failed_at_claim(self, job_ids: list[str]) -> None:
        """Jobs with a corrupt counter that a claim took: each failed alone, its error naming the field."""
        if not job_ids:
            return
        with self.sync.pipeline(transaction=True) as p:
            for job_id in job_ids:
                p.hget(self.k.state, job_id)
                p.hget(self.k.errors, job_id)
                p.hget(self.k.attempts, job_id)
                p.hget(self.k.stalls, job_id)
            replies = p.execute()
        for n, job_id in enumerate(job_ids):
            state, error, attempts, stalls = replies[4 * n : 4 * n + 4]
            fields = [f for f, v in self.corrupt[job_id].items() if v is not None and not v.isdigit()]
            assert state == "failed", f"{job_id} with a corrupt {fields} is {state!r}"
            assert error is not None
            info = _codec.decode_error(error.encode("utf-8", "surrogateescape"))
            assert any(f in info.message for f in fields), f"the reason names no corrupt field: {info}"
            self.errors[job_id] = error
            # Kept as stored or dropped: either way the job's record says what the script left.
            self.corrupt[job_id] = {"attempts": attempts, "stalls": stalls}

    @precondition(lambda self: set(self.wait) - set(self.corrupt))
    @rule(data=st.data(), field=st.sampled_from(["attempts", "stalls"]), value=CORRUPT)
    def corrupt_field(self, data: st.DataObject, field: str, value: str) -> None:
        """A waiting job's stored attempts or stalls becomes a non-count (by hand, a bad migration)."""
        job_id = data.draw(st.sampled_from(sorted(set(self.wait) - set(self.corrupt))), label="job")
        self.sync.hset(getattr(self.k, field), job_id, value)
        self.corrupt[job_id] = {
            "attempts": str(self.attempts[job_id]) if self.attempts[job_id] else None,
            "stalls": str(self.stalls[job_id]) if self.stalls[job_id] else None,
            field: value,
        }

    @precondition(lambda self: self.live())
    @rule(data=st.data(), lease=LEASES)
    def renew(self, data: st.DataObject, lease: int) -> None:
        """Renew some held leases for 60 s or 0 ms; exactly the ones no longer current come back as lost."""
        pairs = self.draw_deliveries(data, 3)
        renewed = []
        lost = []
        for job_id, token in pairs:
            if self.current(job_id, token) and lease == 0:
                self.active[job_id].expired_at = -1  # expired: `expire` sets the tick below
                renewed.append(job_id)
            elif not self.current(job_id, token):
                lost.append(job_id.encode())
        assert self.call("renew", scripts.renew(self.client, self.k, pairs, lease_ms=lease)) == lost
        self.expire(renewed)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        """Complete a batch of held deliveries; only current ones are recorded, the rest count as stale."""
        self.complete_these(self.draw_deliveries(data, 3))

    def complete_these(self, pairs: list[tuple[str, str]]) -> None:
        """One complete call, its acks judged in turn: current ones are recorded; resends of the delivery that
        completed a job (earlier in this call, or before it) answer recorded and write nothing; the rest are
        stale."""
        jobs = []
        expected = []
        done: list[str] = []
        for job_id, token in pairs:
            result = f"res-{job_id}-{self.next_serial()}"
            jobs.append((job_id, token, result))
            if self.current(job_id, token):
                del self.active[job_id]
                self.kept[job_id] = token
                done.append(job_id)
                self.results[job_id] = result
                self.stats["completed"] += 1
                expected.append(True)
            elif job_id in done:
                expected.append(self.kept[job_id] == token)
                self.stats["stale_acks"] += self.kept[job_id] != token
            elif self.recorded(job_id, token, "completed"):
                expected.append(True)
            else:
                self.stats["stale_acks"] += 1
                expected.append(False)
        assert self.call("complete", self.complete_call(jobs)) == expected
        self.woken("completed", done)
        self.finish("completed", done)
        self.drop_held(pairs)

    def complete_call(self, jobs: list[tuple[str, str, str]]) -> Awaitable[list[bool]]:
        return scripts.complete(
            self.client,
            self.k,
            jobs,
            keep_count=self.keep_completed,
            keep_age_ms=-1,
            notify_ttl_ms=NOTIFY_TTL_MS,
        )

    def fail_call(self, job_id: str, token: str, error: str, spent: bool) -> Awaitable[bool]:
        return scripts.fail(
            self.client,
            self.k,
            job_id,
            token,
            error,
            spent=spent,
            keep_count=self.keep_failed,
            keep_age_ms=-1,
            notify_ttl_ms=NOTIFY_TTL_MS,
        )

    @precondition(lambda self: self.live())
    @rule(data=st.data(), spent=st.booleans())
    def fail(self, data: st.DataObject, spent: bool) -> None:
        """Fail one held delivery, spending an attempt or not (stale ones: see `stale_ack`)."""
        [(job_id, token)] = self.draw_deliveries(data, 1)
        self.fail_this(job_id, token, spent)

    def fail_this(self, job_id: str, token: str, spent: bool) -> None:
        error = f"err-fail-{self.next_serial()}"
        del self.active[job_id]
        self.kept[job_id] = token
        self.errors[job_id] = error
        self.attempts[job_id] += int(spent)
        self.stats["failed"] += 1
        assert self.call("fail", self.fail_call(job_id, token, error, spent)) is True
        self.woken("failed", [job_id])
        self.finish("failed", [job_id])
        self.drop_held([(job_id, token)])

    @rule(data=st.data(), outcome=st.sampled_from(["complete", "complete", "fail"]))
    def worker_round(self, data: st.DataObject, outcome: str) -> None:
        """A worker's whole round at once: claim a batch, then complete it (or fail its first job). Jobs reach
        their end (and retention and result waiters their work) far more often than by single steps."""
        before = set(self.held)
        self.claim(data)
        fresh = [(h.id, h.token) for h in self.held if h not in before and self.current(h.id, h.token)]
        if not fresh:
            return
        if outcome == "complete":
            self.complete_these(fresh)
        else:
            self.fail_this(*fresh[0], spent=True)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), delay=st.sampled_from([0, LATER_MS]))
    def retry(self, data: st.DataObject, delay: int) -> None:
        """Retry one held delivery now (to the back of wait) or much later (delayed); it spends an attempt."""
        [(job_id, token)] = self.draw_deliveries(data, 1)
        error = f"err-retry-{self.next_serial()}"
        del self.active[job_id]
        self.attempts[job_id] += 1
        self.errors[job_id] = error
        self.stats["retried"] += 1
        if delay:
            self.delayed[job_id] = 0
        else:
            self.wait.insert(0, job_id)
        retried = scripts.retry(self.client, self.k, job_id, token, delay_ms=delay, error=error)
        assert self.call("retry", retried) is True
        self.drop_held([(job_id, token)])

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Release held deliveries to the front of wait without spending an attempt."""
        pairs = self.draw_deliveries(data, 3)
        expected = []
        for job_id, token in pairs:
            if self.current(job_id, token):
                del self.active[job_id]
                self.wait.append(job_id)  # RPUSH: the next RPOP takes it
                self.stats["released"] += 1
                expected.append(True)
            else:
                self.stats["stale_acks"] += 1
                expected.append(False)
        assert self.call("release", scripts.release(self.client, self.k, pairs)) == expected
        self.drop_held(pairs)

    @rule(data=st.data(), op=st.sampled_from(["complete", "fail", "retry", "release", "renew"]))
    def stale_ack(self, data: st.DataObject, op: str) -> None:
        """An ack (or renew) with an old, expired or made-up token changes nothing; acks are counted."""
        made_up = st.tuples(
            st.sampled_from([*sorted(self.envelopes), "ghost"]), st.sampled_from(BOGUS_TOKENS)
        )
        stale = self.stale_pairs()
        # A resend of the ack that finished a job is recorded, not stale (see `ack_sent_again`); retry,
        # release and renew of that delivery are stale all the same.
        if op in ("complete", "fail"):
            outcome: Literal["completed", "failed"] = "completed" if op == "complete" else "failed"
            stale = [(i, t) for i, t in stale if not self.recorded(i, t, outcome)]
        pair = st.one_of(st.sampled_from(stale), made_up) if stale else made_up
        n = 1 if op in ("fail", "retry") else data.draw(st.integers(1, 3), label="n")
        pairs = data.draw(st.lists(pair, min_size=n, max_size=n), label="stale deliveries")
        assert not any(self.current(i, t) for i, t in pairs)
        before = self.without_time(self.snapshot())
        if op == "complete":
            late = [(i, t, "late-result") for i, t in pairs]
            assert self.call("complete", self.complete_call(late)) == [False] * n
        elif op == "fail":
            [(i, t)] = pairs
            assert self.call("fail", self.fail_call(i, t, "late-error", True)) is False
        elif op == "retry":
            [(i, t)] = pairs
            retried = scripts.retry(self.client, self.k, i, t, delay_ms=0, error="late-error")
            assert self.call("retry", retried) is False
        elif op == "release":
            assert self.call("release", scripts.release(self.client, self.k, pairs)) == [False] * n
        else:
            # renew is not an ack: it reports the lost ids (the worker cancels those handlers) and, per
            # renew.lua's contract, does not count them as stale acks.
            lost = self.call("renew", scripts.renew(self.client, self.k, pairs, lease_ms=LONG_MS))
            assert lost == [i.encode() for i, _ in pairs]
        if op != "renew":
            self.stats["stale_acks"] += n
        # Everything is as before, except the stale_acks counter (checked against the model's count).
        after = self.without_time(self.snapshot())
        before["stats"] = {name: str(value) for name, value in self.stats.items() if value}
        assert after == before, "a stale delivery changed the queue"

    @precondition(lambda self: self.kept)
    @rule(data=st.data(), op=st.sampled_from(["complete", "fail"]))
    def ack_sent_again(self, data: st.DataObject, op: str) -> None:
        """The reply to a complete or fail was lost after the script ran, and the worker sends the ack again:
        it is answered as recorded, and nothing changes (no write, no stale ack counted)."""
        outcome: Literal["completed", "failed"] = "completed" if op == "complete" else "failed"
        recorded = self.recorded_pairs(outcome)
        if not recorded:
            return
        n = 1 if op == "fail" else data.draw(st.integers(1, 3), label="n")
        pairs = data.draw(st.lists(st.sampled_from(recorded), min_size=n, max_size=n), label="resent")
        before = self.without_time(self.snapshot())
        if op == "complete":
            again = [(i, t, f"res-again-{self.next_serial()}") for i, t in pairs]
            assert self.call("complete", self.complete_call(again)) == [True] * n
        else:
            [(i, t)] = pairs
            assert self.call("fail", self.fail_call(i, t, f"err-again-{self.next_serial()}", True)) is True
        assert self.without_time(self.snapshot()) == before, "a resent ack changed the queue"

    @precondition(lambda self: self.held)
    @rule(worker=st.sampled_from(WORKERS))
    def crash_worker(self, worker: int) -> None:
        """A worker dies: its deliveries stay active on the server, but nobody will ack or renew them."""
        self.held = [h for h in self.held if h.worker != worker]

    # -- the stalled-job checker -----------------------------------------------------------------------

    def recover_call(self) -> scripts.Recovered | None:
        recovering = scripts.recover(
            self.client,
            self.k,
            checker="test-checker",
            lock_ms=LONG_MS,
            max_stalls=self.max_stalls,
            stalled_error="stalled",
            keep_count=self.keep_failed,
            keep_age_ms=-1,
            limit=RECOVER_LIMIT,
        )
        return self.call("recover", recovering)

    @initialize(max_stalls=st.integers(0, 2))
    def choose_max_stalls(self, max_stalls: int) -> None:
        """The checker's max_stalls for this run (0: the first stall fails a job)."""
        self.max_stalls = max_stalls

    @initialize(keep_completed=KEEPS, keep_failed=KEEPS)
    def choose_retention(self, keep_completed: int, keep_failed: int) -> None:
        """How many completed and failed jobs this run keeps (1-3: trimming runs all along)."""
        self.keep_completed = keep_completed
        self.keep_failed = keep_failed

    @rule(second_checker=st.booleans())
    def recover(self, second_checker: bool) -> None:
        """Recover exactly the expired leases: back to wait, or failed once stalled past max_stalls."""
        self.sync.delete(self.k.checker)  # the previous check's interval is over
        expected = {i for i, lease in self.active.items() if lease.expired}
        res = self.recover_call()
        assert res is not None, "the checker lock was left taken"
        ids = [i.decode() for i in res.ids]
        assert len(ids) == len(set(ids))
        assert set(ids) == expected
        recovered, failed = 0, []
        for job_id in ids:  # in the script's order: each RPUSH puts the job next in line
            del self.active[job_id]
            self.stalls[job_id] += 1
            if self.stalls[job_id] > self.max_stalls:
                self.errors[job_id] = "stalled"
                failed.append(job_id)
            else:
                self.wait.append(job_id)
                recovered += 1
        assert (res.requeued, res.failed) == (recovered, len(failed))
        self.maybe_registered |= self.registered & set(failed)  # recover wakes no waiter
        self.registered -= set(failed)
        self.finish("failed", failed)
        self.stats["stalled"] += recovered + len(failed)
        self.stats["failed"] += len(failed)
        if not second_checker:
            return
        # A second checker within the same interval finds the lock taken and does nothing.
        self.check_matches_model()
        before = self.without_time(self.snapshot())
        assert self.recover_call() is None
        assert self.without_time(self.snapshot()) == before

    # -- the operator ----------------------------------------------------------------------------------

    def requeue(self, job_id: str) -> None:
        """retry_failed.lua on one failed job: to the back of wait, its counters and last error cleared."""
        del self.failed[job_id]
        del self.attempts[job_id]
        del self.stalls[job_id]
        self.corrupt.pop(job_id, None)
        self.errors.pop(job_id, None)
        self.maybe_registered |= self.registered & {job_id}
        self.registered.discard(job_id)
        self.wait.insert(0, job_id)
        self.stats["requeued"] += 1
        self.finished.pop(job_id, None)  # no longer finished: it may change again

    @precondition(lambda self: self.failed)
    @rule(data=st.data())
    def retry_failed(self, data: st.DataObject) -> None:
        """Retry jobs by id: a failed one is requeued (1), another is left alone (0), an unknown id is -1."""
        others = sorted(set(self.envelopes) - set(self.failed))
        freed = sorted(self.trimmed - set(self.envelopes))
        ids = data.draw(
            st.lists(
                st.sampled_from(sorted(self.failed)) | st.sampled_from([*others, *freed, "ghost"]),
                min_size=1,
                max_size=4,
            ),
            label="ids",
        )
        expected = []
        for job_id in ids:  # in order: an id given twice is requeued once, then is not failed
            if job_id not in self.envelopes:
                expected.append(-1)
            elif job_id not in self.failed:
                expected.append(0)
            else:
                self.requeue(job_id)
                expected.append(1)
        assert self.call("retry_failed", scripts.retry_failed(self.client, self.k, ids)) == expected

    @precondition(lambda self: self.failed)
    @rule(n=st.integers(1, 3))
    def retry_oldest_failed(self, n: int) -> None:
        """Retry the `n` oldest failures, oldest first; the reply counts jobs moved and failed ones left."""
        oldest = sorted(self.failed, key=self.failed.__getitem__)[:n]
        for job_id in oldest:
            self.requeue(job_id)
        reply = self.call("retry_failed", scripts.retry_oldest_failed(self.client, self.k, n))
        assert reply == (len(oldest), len(self.failed))

    # -- result waiters ---------------------------------------------------------------------------------

    @rule(data=st.data())
    def watch(self, data: st.DataObject) -> None:
        """A result waiter looks at a job (``Job.result``'s first step): it reads the job's state and outcome,
        and, if the job is unfinished, registers and then blocks on the job's notify list."""
        freed = sorted(self.trimmed - set(self.envelopes))
        unfinished = sorted({*self.wait, *self.delayed, *self.active})
        anyone = st.sampled_from([*sorted(self.envelopes), *freed, "ghost"])
        # Mostly a job that is not finished: the waiter then waits, and a later step may finish the job.
        job_id = data.draw(st.sampled_from(unfinished) | anyone if unfinished else anyone, label="job")
        state, raw = self.call("watch", scripts.watch(self.client, self.k, job_id))
        expected = self.location(job_id) if job_id in self.envelopes else None
        assert state == expected
        if expected == "completed":
            assert raw is not None
            assert raw.decode() == self.results[job_id]
        elif expected == "failed":
            assert raw is not None
            assert raw.decode("utf-8", "surrogateescape") == self.errors[job_id]
        else:
            assert raw is None
        if expected in (None, "completed", "failed"):
            return
        self.registered.add(job_id)
        self.maybe_registered.discard(job_id)
        # The waiter's blocking wait (BLMOVE on the notify list) must block until this life of the job
        # finishes: a wake-up already there, left by an earlier life of the id (before retry_failed, or
        # before a trim and a new add), would end every wait at once and make it spin.
        assert self.sync.llen(self.k.notify(job_id)) == 0, (
            f"a result waiter on unfinished job {job_id} would wake at once: its notify list holds "
            f"{self.sync.lrange(self.k.notify(job_id), 0, -1)}"
        )

    # -- time passing, and the server forgetting scripts ------------------------------------------------

    def clocks(self) -> list[tuple[str, str]]:
        live = [("lease", i) for i, lease in sorted(self.active.items()) if not lease.expired]
        return live + [("delay", i) for i, order in sorted(self.delayed.items()) if order == 0]

    @precondition(lambda self: self.clocks())
    @rule(data=st.data())
    def time_passes(self, data: st.DataObject) -> None:
        """Time passes for one job: its lease deadline, or its due time, moves into the past."""
        what, job_id = data.draw(st.sampled_from(self.clocks()), label="clock")
        self.tick += 1
        if what == "lease":
            assert self.sync.zadd(self.k.active, {job_id: self.tick}, xx=True) == 0
            self.active[job_id].expired_at = self.tick
        else:
            assert self.sync.zadd(self.k.delayed, {job_id: self.tick}, xx=True) == 0
            self.delayed[job_id] = self.tick

    @rule(mode=st.sampled_from(["SYNC", "ASYNC"]))
    def script_flush(self, mode: Literal["SYNC", "ASYNC"]) -> None:
        """The server forgets every script; the next calls must reload them (NOSCRIPT -> EVAL)."""
        self.sync.script_flush(mode)

    # -- invariants ------------------------------------------------------------------------------------

    @invariant()
    def check_matches_model(self) -> None:
        """The real queue is exactly the model: every job in one place, with its state, token and counts."""
        s = self.snapshot()
        now = s["now"]
        # Every acknowledged job is in exactly one of the five places: nothing lost, nothing duplicated.
        places = Counter([*s["wait"], *s["delayed"], *s["active"], *s["completed"], *s["failed"]])
        assert places == Counter(list(self.envelopes)), "a job was lost or is in two places"
        assert s["wait"] == self.wait
        assert set(s["delayed"]) == set(self.delayed)
        assert set(s["active"]) == set(self.active)
        assert s["completed"] == {i: float(tick) for i, tick in self.completed.items()}
        assert s["failed"] == {i: float(tick) for i, tick in self.failed.items()}
        # Retention: complete, fail and recover trim the set they add to down to its keep count (claim is
        # given no retention: its failures wait for the next fail or recover).
        assert len(s["completed"]) <= self.keep_completed
        assert s["state"] == {i: self.location(i) for i in self.envelopes}
        # An active job has its delivery's token; a job complete or fail finished keeps its finishing token
        # (also once requeued by retry_failed, until its next claim) until trimmed; no other job has one.
        # A lease is live only while deadline > now.
        assert s["tokens"] == {i: lease.token for i, lease in self.active.items()} | self.kept
        assert not self.kept.keys() & self.active.keys()
        for i, lease in self.active.items():
            assert (s["active"][i] <= now) == lease.expired, f"lease of {i} expired unexpectedly"
        for i, order in self.delayed.items():
            assert (s["delayed"][i] <= now) == bool(order), f"due time of {i}"
        assert s["jobs"] == self.envelopes
        for name in ("attempts", "stalls"):
            counts: Counter[str] = getattr(self, name)
            stored = {i: str(n) for i, n in counts.items() if n and i not in self.corrupt}
            stored |= {i: fields[name] for i, fields in self.corrupt.items() if fields[name] is not None}
            assert s[name] == stored, name
        sound = {i: n for i, n in s["stalls"].items() if i not in self.corrupt}
        assert all(int(n) <= self.max_stalls + 1 for n in sound.values())
        assert all(i in s["failed"] for i, n in sound.items() if int(n) > self.max_stalls)
        assert s["results"] == self.results
        assert s["errors"] == self.errors
        # A waiter entry only for a job some waiter registered on since it last finished (one that claim or
        # recover failed, or retry_failed requeued, may keep it or not), and for every such job still waiting.
        assert set(s["waiters"]) <= self.registered | self.maybe_registered
        assert self.registered <= set(s["waiters"]), "a registered waiter was dropped"
        assert s["stats"] == {name: str(value) for name, value in self.stats.items() if value}
        assert s["meta"] == {"schema": str(SCHEMA_VERSION)} or not self.envelopes
        # Scripts write only the queue's declared keys (Redis Cluster needs every key passed in KEYS), and the
        # notify list of a job whose waiter complete or fail woke, which expires within the notify TTL.
        declared = set(self.k.all_fixed())
        notify = {self.k.notify(i) for i in self.notified}
        found = [
            k for k in self.sync.scan_iter(match=f"{self.k.prefix}:*", count=10_000) if k not in declared
        ]
        assert not [k for k in found if k not in notify], "a script wrote an undeclared key"
        for key in found:
            assert 0 < self.sync.pttl(key) <= NOTIFY_TTL_MS, f"{key} is not bounded in time"
        # A finished job never changes again.
        for i in [*s["completed"], *s["failed"]]:
            record = (
                s["state"][i],
                s["completed"].get(i),
                s["failed"].get(i),
                s["results"].get(i),
                s["errors"].get(i),
                s["attempts"].get(i),
                s["stalls"].get(i),
                s["jobs"][i],
            )
            assert self.finished.setdefault(i, record) == record, f"finished job {i} changed"

    @invariant()
    def check_every_transition_is_a_row(self) -> None:
        """Since the last check, each stored state moved only along TRANSITIONS rows of the scripts run."""
        states = {str(i): str(state) for i, state in self.sync.hgetall(self.k.state).items()}
        ran, self.ran = self.ran, []
        trimmed, self.just_trimmed = self.just_trimmed, set()
        for job_id in sorted(self.seen.keys() | states.keys()):
            before, after = self.seen.get(job_id), states.get(job_id)
            if before == after:
                continue
            if after is None and job_id in trimmed:
                # Retention deleted it once finished (by rows of the scripts that ran): not a move, gone.
                after = "completed" if explained(before, "completed", ran) else "failed"
            assert explained(before, after, ran), (
                f"job {job_id} went {before or '(new)'} -> {after} while {', '.join(ran) or 'no script'} "
                f"ran, and no row of qflow._state.TRANSITIONS explains it (rows of those scripts: "
                f"{show_rows(ran)}): add the row and run `python docs/hooks/lifecycle.py`, or fix the script"
            )
        self.seen = states


# A passing run takes seconds. A failing one shrinks for up to Hypothesis's own 5-minute cap; a pytest timeout
# before that would cut the shrink short and bury the minimal step list under a FlakyStrategyDefinition.
@pytest.mark.timeout(420)
def test_lifecycle_scripts_match_the_model_under_any_interleaving(redis_url: str) -> None:
    """Any mix of adds, claims, acks, crashes, recoveries and retries keeps jobs in one place, on rows."""
    # No explain phase: it re-runs the failing case under a line tracer, which with a server round trip per
    # step takes minutes and runs into the pytest timeout; the shrunk step list is what one needs.
    run_state_machine_as_test(
        lambda: LifecycleMachine(redis_url),  # type: ignore[arg-type]  # a factory works too
        settings=settings(stateful_step_count=50, phases=[p for p in Phase if p is not Phase.explain]),
    )


async def test_complete_trims_oldest_completed_jobs_and_their_fields(redis_url: str, prefix: str) -> None:
    """Completing past the keep count drops the oldest completed jobs and every per-job field they own."""
    k = QueueKeys(prefix, QUEUE)
    client = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        jobs = [scripts.NewJob(f"j{n}", f"env-j{n}") for n in range(5)]
        assert await scripts.add(client, k, jobs) == [True] * 5
        res = await scripts.claim(client, k, count=5, lease_ms=LONG_MS, promote_limit=PROMOTE_LIMIT)
        tokens = {job.id.decode(): job.token for job in res.jobs}
        # Give j0 an attempt and an error, so trimming has those fields to remove too.
        assert await scripts.retry(client, k, "j0", tokens["j0"], delay_ms=0, error="boom") is True
        res = await scripts.claim(client, k, count=1, lease_ms=LONG_MS, promote_limit=PROMOTE_LIMIT)
        [again] = res.jobs
        tokens["j0"] = again.token
        for n in range(5):  # equal scores (same ms) sort by id, which is also the completion order here
            job_id = f"j{n}"
            done = [(job_id, tokens[job_id], f"res-{job_id}")]
            flags = await scripts.complete(
                client, k, done, keep_count=3, keep_age_ms=-1, notify_ttl_ms=NOTIFY_TTL_MS
            )
            assert flags == [True]
        assert await client.zrange(k.completed, 0, -1) == [b"j2", b"j3", b"j4"]
        for h in (k.jobs, k.state, k.results, k.errors, k.attempts, k.stalls, k.waiters):
            assert await client.hmget(h, ["j0", "j1"]) == [None, None], h
        assert await client.hget(k.stats, "completed") == b"5"
        # A trimmed id is free again.
        assert await scripts.add(client, k, [scripts.NewJob("j0", "env-again")]) == [True]
    finally:
        await client.aclose()
