"""Fair admission: who is asking, and which waiting job of an engine runs next.

The edge names the account behind every capability call in gRPC metadata
(``x-kiln-account``, the id billing's Authorize returned, and ``x-kiln-tier``:
``premium`` or ``standard``); the server's interceptor puts it in
:data:`caller_var` for the call's task, so an engine's queue sees who submits
each job. A direct gRPC caller that sends neither is the one account
``anonymous``, standard tier.

Every engine queue (:class:`FairQueue`) is **bounded** and **fair**:

* At most ``max_waiting`` jobs wait per engine, and at most
  ``max_waiting_per_account`` of one account; beyond that, submitting raises
  :class:`~services.common.errors.RateLimited` (a 429 at the edge; a task's
  run retries it later, so the task stays pending) and nothing is queued.
* Accounts are served by start-time fair queuing (SFQ, Goyal et al. 1996): a
  job's tag is ``max(virtual time, its account's last finish tag)``, each job
  advances its account's finish tag by one, and the smallest tag runs next
  (ties in arrival order). An account that has been quiet gets the current
  virtual time, so its job runs before the flooding account's next one; two
  flooding accounts alternate. Plain round robin would let the flooder's job
  at the head of the rotation go first.
* Premium accounts have their own lane, served ``premium_weight`` times for
  each standard admission while both lanes have jobs waiting (1: one of every
  two), so premium goes ahead but cannot starve standard.

``fair=False`` turns the queue into one FIFO (the benchmark's baseline); the
bounds still apply. :class:`Slots` puts a :class:`FairQueue` in front of a
fixed number of worker slots (``StepRunner``); the llm decode loop uses a
:class:`FairQueue` directly for its pending requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from services.common.errors import RateLimited

if TYPE_CHECKING:
    from services.common.settings import Settings

T = TypeVar("T")

#: The account of a call that names none (a direct gRPC caller).
ANONYMOUS = "anonymous"
#: gRPC metadata keys the edge sends with every capability call.
ACCOUNT_METADATA = "x-kiln-account"
TIER_METADATA = "x-kiln-tier"
PREMIUM = "premium"
STANDARD = "standard"
#: Longest account id taken from metadata (longer ones are cut; they only group jobs).
MAX_ACCOUNT_CHARS = 128


@dataclass(frozen=True)
class Caller:
    """Who a job is for: an account id and whether it is premium."""

    account: str = ANONYMOUS
    premium: bool = False


#: A call that names no account.
ANONYMOUS_CALLER = Caller()
#: The caller of the current request: set by the edge's billed flow (what it sends), and by
#: the gRPC server's interceptor for each call (what the engines' queues read).
caller_var: contextvars.ContextVar[Caller] = contextvars.ContextVar("kiln_caller", default=ANONYMOUS_CALLER)


def caller_metadata(caller: Caller | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata that names ``caller`` (default: the current one); none for anonymous."""
    caller = caller or caller_var.get()
    if caller.account == ANONYMOUS:
        return ()
    return ((ACCOUNT_METADATA, caller.account), (TIER_METADATA, PREMIUM if caller.premium else STANDARD))


def caller_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
    """The caller a call's metadata names (anonymous, standard when it names none)."""
    account, premium = ANONYMOUS, False
    for key, value in metadata or ():
        if key == ACCOUNT_METADATA and isinstance(value, str) and value:
            account = value[:MAX_ACCOUNT_CHARS]
        elif key == TIER_METADATA:
            premium = value == PREMIUM
    return Caller(account, premium)


@dataclass(frozen=True)
class QueuePolicy:
    """How an engine's queue admits jobs (the ``engine_queue_*`` settings)."""

    max_waiting: int = 64
    max_waiting_per_account: int = 32
    fair: bool = True
    premium_weight: int = 1

    def __post_init__(self) -> None:
        if self.max_waiting < 0 or self.max_waiting_per_account < 0 or self.premium_weight < 1:
            raise ValueError("queue bounds must not be negative and premium_weight must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> QueuePolicy:
        return cls(
            max_waiting=settings.engine_queue_max,
            max_waiting_per_account=settings.engine_queue_max_per_account,
            fair=settings.engine_fair_admission,
            premium_weight=settings.engine_premium_weight,
        )

    @property
    def per_account(self) -> int:
        """The per-account bound in force (0 means the engine's bound)."""
        return min(self.max_waiting, self.max_waiting_per_account or self.max_waiting)


#: The ``Retry-After`` of a request refused by a full queue.
QUEUE_RETRY_AFTER_SECONDS = 2.0


def queue_full(name: str) -> RateLimited:
    return RateLimited(
        f"The {name} queue is full; try again in a few seconds.", retry_after=QUEUE_RETRY_AFTER_SECONDS
    )


def account_queue_full(name: str) -> RateLimited:
    return RateLimited(
        f"You have too many requests waiting for {name}; try again in a few seconds "
        "(or send fewer at a time).",
        retry_after=QUEUE_RETRY_AFTER_SECONDS,
    )


@dataclass
class _Lane(Generic[T]):
    """One lane of start-time fair queuing: per-account FIFOs of (tag, arrival, item)."""

    vtime: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)
    queues: dict[str, collections.deque[tuple[float, int, T]]] = field(default_factory=dict)

    def push(self, account: str, item: T, seq: int, fair: bool) -> None:
        start = max(self.vtime, self.finish.get(account, 0.0)) if fair else float(seq)
        self.finish[account] = start + 1.0
        self.queues.setdefault(account, collections.deque()).append((start, seq, item))

    def head(self) -> tuple[float, int, str] | None:
        best: tuple[float, int, str] | None = None
        for account, queue in self.queues.items():
            start, seq, _ = queue[0]
            if best is None or (start, seq) < best[:2]:
                best = (start, seq, account)
        return best

    def pop(self, account: str) -> T:
        queue = self.queues[account]
        start, _, item = queue.popleft()
        if not queue:
            del self.queues[account]
        self._advance(start)
        return item

    def served(self, account: str) -> None:
        """A job of ``account`` ran without waiting: it counts as served all the same."""
        start = max(self.vtime, self.finish.get(account, 0.0))
        self.finish[account] = start + 1.0
        self._advance(start)

    def _advance(self, start: float) -> None:
        self.vtime = max(self.vtime, start)
        # An account whose finish tag the virtual time has passed starts afresh anyway.
        for idle in [a for a, tag in self.finish.items() if tag <= self.vtime and a not in self.queues]:
            del self.finish[idle]

    def remove(self, item: T) -> str | None:
        for account, queue in self.queues.items():
            for entry in queue:
                if entry[2] is item:
                    queue.remove(entry)
                    if not queue:
                        del self.queues[account]
                    return account
        return None


class FairQueue(Generic[T]):
    """The bounded, fair waiting room of one engine (see the module docs). Not thread-safe:
    the asyncio users call it on the event loop, the llm decode loop under its lock."""

    def __init__(self, name: str, policy: QueuePolicy | None = None) -> None:
        self.name = name
        self.policy = policy or QueuePolicy()
        self._lanes: dict[bool, _Lane[T]] = {False: _Lane(), True: _Lane()}
        self._accounts: collections.Counter[str] = collections.Counter()
        #: id(item) -> (premium lane?, the caller's account)
        self._where: dict[int, tuple[bool, str]] = {}
        self._seq = itertools.count()
        self._premium_streak = 0

    def __len__(self) -> int:
        return len(self._where)

    def waiting_of(self, account: str) -> int:
        return self._accounts[account]

    def check(self, caller: Caller) -> None:
        """Raises :class:`RateLimited` when a job of ``caller`` would not fit."""
        if len(self) >= self.policy.max_waiting:
            raise queue_full(self.name)
        if self._accounts[caller.account] >= self.policy.per_account:
            raise account_queue_full(self.name)

    def push(self, item: T, caller: Caller, *, bounded: bool = True) -> None:
        """Queues ``item`` for ``caller``; raises :class:`RateLimited` (queuing nothing) when
        ``bounded`` and the engine's or the account's bound is reached."""
        if bounded:
            self.check(caller)
        fair = self.policy.fair
        premium = caller.premium and fair
        account = caller.account if fair else ""  # one FIFO when fairness is off
        self._lanes[premium].push(account, item, next(self._seq), fair)
        self._where[id(item)] = (premium, caller.account)
        self._accounts[caller.account] += 1

    def served(self, caller: Caller) -> None:
        """Records a job of ``caller`` that ran without waiting (a free slot), so that its
        account's next jobs queue behind those of accounts that had less."""
        if self.policy.fair:
            self._lanes[caller.premium].served(caller.account)

    def pop(self) -> T | None:
        """The job to run next (None when nothing waits)."""
        standard, premium = self._lanes[False].head(), self._lanes[True].head()
        if premium is not None and (standard is None or self._premium_streak < self.policy.premium_weight):
            self._premium_streak = self._premium_streak + 1 if standard is not None else 0
            return self._take(True, premium[2])
        if standard is not None:
            self._premium_streak = 0
            return self._take(False, standard[2])
        return None

    def _take(self, lane: bool, account: str) -> T:
        item = self._lanes[lane].pop(account)
        self._forget(item)
        return item

    def _forget(self, item: T) -> None:
        _, owner = self._where.pop(id(item))
        self._accounts[owner] -= 1
        if self._accounts[owner] <= 0:
            del self._accounts[owner]

    def remove(self, item: T) -> bool:
        """Takes a waiting ``item`` out (its consumer left); False when it is not waiting."""
        where = self._where.get(id(item))
        if where is None or self._lanes[where[0]].remove(item) is None:
            return False
        self._forget(item)
        return True

    def discard(self, unwanted: Callable[[T], bool]) -> int:
        """Takes out every waiting item ``unwanted`` says is unwanted; returns how many."""
        items = [entry[2] for lane in self._lanes.values() for q in lane.queues.values() for entry in q]
        return sum(self.remove(item) for item in items if unwanted(item))

    def drain(self) -> Iterator[T]:
        """Takes out every waiting item, in admission order."""
        while (item := self.pop()) is not None:
            yield item


class Slots:
    """``concurrency`` worker slots behind a :class:`FairQueue` (an ``asyncio.Semaphore``
    that admits fairly and refuses when its queue is full). Event-loop only."""

    def __init__(self, name: str, concurrency: int, policy: QueuePolicy | None = None) -> None:
        self.free = concurrency
        self.queue: FairQueue[asyncio.Future[None]] = FairQueue(name, policy)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    async def acquire(self, caller: Caller | None = None, *, bounded: bool = True) -> None:
        """Waits for a slot (``caller`` defaults to the current one); raises
        :class:`RateLimited` at once when ``bounded`` and its queue is full."""
        caller = caller or caller_var.get()
        if self.free > 0 and not self.queue:
            self.free -= 1
            self.queue.served(caller)
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.push(granted, caller, bounded=bounded)
        try:
            await granted
        except asyncio.CancelledError:
            if not self.queue.remove(granted) and granted.done() and not granted.cancelled():
                self.release()  # the slot came as the waiter was cancelled: pass it on
            raise

    async def __aenter__(self) -> None:
        """``async with slots:`` waits as the current caller, never refused (work already admitted)."""
        await self.acquire(bounded=False)

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Hands the slot to the next waiting job (or frees it)."""
        while (granted := self.queue.pop()) is not None:
            if not granted.done():
                granted.set_result(None)
                return
        self.free += 1


@contextmanager
def counted(counts: collections.Counter[str], name: str, policy: QueuePolicy) -> Iterator[None]:
    """Counts one request of the current caller in ``counts`` (key ``""``: the total) while it
    is in flight, refusing it with :class:`RateLimited` beyond the policy's bounds: the bound
    of an engine whose own batcher queues the work (one request is many tiles)."""
    account = caller_var.get().account
    if counts[""] >= policy.max_waiting:
        raise queue_full(name)
    if counts[account] >= policy.per_account:
        raise account_queue_full(name)
    counts[""] += 1
    counts[account] += 1
    try:
        yield
    finally:
        counts[""] -= 1
        counts[account] -= 1
        if not counts[account]:
            del counts[account]
