"""Rate limits: requests per minute per account and capability, and synchronous jobs in flight.

**Requests per minute** are counted by the limiter, Envoy's rate limit service
(``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit``, vendored in
``protos/third_party/kiln/vendor/envoy``), which the billing server serves. It is asked
with descriptors ``[("credential", <the X-API-Key or Authorization value as sent>),
("capability", <name>)]``: by the edge before each paid request (``edge.ratelimit``), or
by Envoy's global rate-limit filter in front (``kiln envoy-config`` with
``KILN_RATE_LIMIT_ENVOY``). Billing resolves the credential to the account itself, reads
the account's limit for the capability (:class:`RateLimitPolicy`) and counts the request
in a moving window of one minute with the ``limits`` library: in memory
(``KILN_RATE_LIMIT_STORAGE=memory://``, one billing process) or in Redis
(``redis://...``: every billing replica, so every edge, shares one budget). A credential
billing does not know, a task's run token and a capability without a limit are answered OK
and not counted: the route's own 401 follows, and the limiter never tells whether a key
exists.

**Jobs in flight**: Authorize counts the account's open holds in the transaction that
places the new one (:meth:`RateLimitPolicy.concurrency_check`); past the account's
``max_concurrent`` it refuses with a 429 and the hold is rolled back. A task's hold (a
queued or running task, table ``tasks``) does not count: tasks queue instead; creating a
task is not refused for concurrency either.

**Limits** come from the settings (``KILN_RATE_LIMIT_*``: a standard and a premium tier,
each a default and per-capability values) unless the account has its own
(``account_rate_limits``, set with ``kiln admin limits``). 0 means no limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from kiln.vendor.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from services.billing.auth import Authenticator
from services.billing.ledger import AccountFinder, AccountRecord, Ledger, ReservationRecord
from services.billing.store import Tx
from services.billing.tasks import is_run_token
from services.common.errors import ErrorType, InvalidRequest, KilnError, NotFound, envelope_json
from services.common.rate_limit_headers import limit_headers, rate_limited, retry_headers
from services.common.settings import Settings

if TYPE_CHECKING:
    from limits import RateLimitItem

#: The service's full name (what the mesh credential check and Envoy's filter name).
SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
#: Descriptor entry keys.
CREDENTIAL_KEY = "credential"
CAPABILITY_KEY = "capability"
#: How long a client refused for concurrency is told to wait (a job's end cannot be known).
CONCURRENCY_RETRY_SECONDS = 1.0
WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class AccountLimits:
    """An account's own limits (``kiln admin limits``); None: the tier's setting."""

    rpm: int | None = None
    capability_rpm: Mapping[str, int] = field(default_factory=dict)
    max_concurrent: int | None = None


@dataclass(frozen=True)
class Tier:
    """The limits of a kind of account (standard or premium), from the settings."""

    rpm: int = 0
    capability_rpm: Mapping[str, int] = field(default_factory=dict)
    max_concurrent: int = 0


@dataclass(frozen=True)
class RateLimitPolicy:
    """Which limit applies: the account's own for the capability, its own default, the tier's
    for the capability, the tier's default (0: none)."""

    standard: Tier = Tier()
    premium: Tier = Tier()

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimitPolicy:
        return cls(
            standard=Tier(
                settings.rate_limit_rpm,
                dict(settings.rate_limit_capability_rpm),
                settings.rate_limit_max_concurrent,
            ),
            premium=Tier(
                settings.rate_limit_rpm_premium,
                dict(settings.rate_limit_capability_rpm_premium),
                settings.rate_limit_max_concurrent_premium,
            ),
        )

    def tier(self, account: AccountRecord) -> Tier:
        return self.premium if account.premium else self.standard

    def rpm(self, account: AccountRecord, own: AccountLimits | None, capability: str) -> int:
        tier = self.tier(account)
        if own is not None and capability in own.capability_rpm:
            return own.capability_rpm[capability]
        if own is not None and own.rpm is not None:
            return own.rpm
        return tier.capability_rpm.get(capability, tier.rpm)

    def max_concurrent(self, account: AccountRecord, own: AccountLimits | None) -> int:
        if own is not None and own.max_concurrent is not None:
            return own.max_concurrent
        return self.tier(account).max_concurrent

    def concurrency_check(
        self, now_ms: Callable[[], int]
    ) -> Callable[[Tx, AccountRecord, ReservationRecord], None]:
        """Authorize's in-transaction check, run after the new hold (a ``then`` of
        :meth:`Ledger.authorize`): past the account's ``max_concurrent`` open holds (its new
        one included; a task's hold excluded) it raises RateLimited, which rolls the hold back."""

        def check(tx: Tx, account: AccountRecord, reservation: ReservationRecord) -> None:
            limit = self.max_concurrent(account, read_limits(tx, account.id))
            if not limit:
                return
            # Take the account row's lock (a hold of 0, premium, did not): concurrent Authorize
            # calls of one account then count one after the other on PostgreSQL too.
            tx.execute("UPDATE accounts SET held = held WHERE id = ?", (account.id,))
            row = tx.one(
                "SELECT COUNT(*) FROM reservations r WHERE r.account_id = ? AND r.state = 'held'"
                " AND r.expires_at_ms > ? AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.reservation_id = r.id)",
                (account.id, now_ms()),
            )
            if row is not None and int(row[0]) > limit:
                raise rate_limited(CONCURRENCY_RETRY_SECONDS)

        return check


def read_limits(tx: Tx, account_id: str) -> AccountLimits | None:
    """The account's own limits, or None when it has none."""
    row = tx.one(
        "SELECT rpm, capability_rpm, max_concurrent FROM account_rate_limits WHERE account_id = ?",
        (account_id,),
    )
    if row is None:
        return None
    capability_rpm = {str(k): int(v) for k, v in json.loads(row[1] or "{}").items()}
    return AccountLimits(
        rpm=None if row[0] is None else int(row[0]),
        capability_rpm=capability_rpm,
        max_concurrent=None if row[2] is None else int(row[2]),
    )


_UNSET = object()


async def set_limits(
    ledger: Ledger,
    account_id: str,
    *,
    rpm: int | object | None = _UNSET,
    capability_rpm: Mapping[str, int | None] | None = None,
    max_concurrent: int | object | None = _UNSET,
) -> AccountLimits:
    """Changes an account's own limits (what is not given stays; a capability given None
    goes back to the default). Returns them as they are now."""
    for value in (rpm, max_concurrent, *(capability_rpm or {}).values()):
        if isinstance(value, int) and value < 0:
            raise InvalidRequest("A rate limit must be 0 (no limit) or more.")
    now = ledger.now_ms()

    def tx_fn(tx: Tx) -> AccountLimits:
        if tx.one("SELECT id FROM accounts WHERE id = ?", (account_id,)) is None:
            raise NotFound(f"No account '{account_id}'.")
        own = read_limits(tx, account_id) or AccountLimits()
        merged = dict(own.capability_rpm)
        for name, value in (capability_rpm or {}).items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        new = AccountLimits(
            rpm=own.rpm if rpm is _UNSET else rpm,  # type: ignore[arg-type]
            capability_rpm=merged,
            max_concurrent=own.max_concurrent if max_concurrent is _UNSET else max_concurrent,  # type: ignore[arg-type]
        )
        tx.execute("DELETE FROM account_rate_limits WHERE account_id = ?", (account_id,))
        tx.execute(
            "INSERT INTO account_rate_limits (account_id, rpm, capability_rpm, max_concurrent, updated_at_ms)"
            " VALUES (?, ?, ?, ?, ?)",
            (account_id, new.rpm, json.dumps(dict(sorted(merged.items()))), new.max_concurrent, now),
        )
        return new

    return await ledger.db.run(tx_fn)


async def reset_limits(ledger: Ledger, account_id: str) -> None:
    """Removes an account's own limits: its tier's settings apply again."""

    def tx_fn(tx: Tx) -> None:
        if tx.one("SELECT id FROM accounts WHERE id = ?", (account_id,)) is None:
            raise NotFound(f"No account '{account_id}'.")
        tx.execute("DELETE FROM account_rate_limits WHERE account_id = ?", (account_id,))

    await ledger.db.run(tx_fn)


async def get_limits(ledger: Ledger, account_id: str) -> AccountLimits | None:
    return await ledger.db.run(lambda tx: read_limits(tx, account_id), write=False)


@dataclass(frozen=True)
class Decision:
    """One request counted against one limit."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float


class RequestCounter:
    """Moving one-minute windows in the ``limits`` library's storage (memory or Redis)."""

    def __init__(self, storage_url: str = "memory://", *, key_prefix: str = "kiln") -> None:
        # Imported here: the kiln CLI (kiln admin) imports this module in every environment,
        # the tts one included, which only billing's needs to count in.
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.storage import storage_from_string

        url = storage_url if storage_url.startswith("async+") else f"async+{storage_url}"
        options: dict[str, str] = {}
        if url.startswith(("async+redis", "async+rediss")):
            # limits' async Redis backend wants coredis unless told to use redis-py.
            options = {"implementation": "redispy", "key_prefix": key_prefix}
        self.storage = storage_from_string(url, **options)
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.namespace = key_prefix

    def _item(self, rpm: int) -> RateLimitItem:
        from limits import RateLimitItemPerMinute

        return RateLimitItemPerMinute(rpm, namespace=self.namespace)

    async def hit(self, account_id: str, capability: str, rpm: int, cost: int = 1) -> Decision:
        item = self._item(rpm)
        allowed = await self.limiter.hit(item, account_id, capability, cost=cost)
        stats = await self.limiter.get_window_stats(item, account_id, capability)
        reset = max(0.0, stats.reset_time - time.time())
        return Decision(allowed, rpm, stats.remaining, reset if stats.remaining < rpm else WINDOW_SECONDS)

    async def clear(self, account_id: str, capability: str, rpm: int) -> None:
        await self.limiter.clear(self._item(rpm), account_id, capability)


#: The descriptor value of a session cookie's request: ``Session <token>`` (edge.ratelimit).
SESSION_SCHEME = "session"


def _credential_finder(authenticator: Authenticator, value: str) -> AccountFinder | None:
    """The account finder of a credential as sent (``X-API-Key`` value, or ``Authorization``
    with or without its ``Bearer`` scheme, or ``Session <token>`` for the session cookie);
    None for a task's run token."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == SESSION_SCHEME and rest.strip():
        return authenticator.finder(session_token=rest.strip())
    token = rest.strip() if scheme.lower() == "bearer" else value.strip()
    if not token or is_run_token(token):
        return None
    return authenticator.finder(bearer_token=token)


class RateLimiter:
    """Resolves a credential, reads its account's limit for a capability and counts the request."""

    def __init__(
        self,
        ledger: Ledger,
        authenticator: Authenticator,
        policy: RateLimitPolicy,
        counter: RequestCounter,
    ) -> None:
        self.ledger = ledger
        self.authenticator = authenticator
        self.policy = policy
        self.counter = counter

    @classmethod
    def from_settings(cls, ledger: Ledger, authenticator: Authenticator, settings: Settings) -> RateLimiter:
        return cls(
            ledger,
            authenticator,
            RateLimitPolicy.from_settings(settings),
            RequestCounter(settings.rate_limit_storage, key_prefix=settings.rate_limit_key_prefix),
        )

    async def check(self, credential: str, capability: str, cost: int = 1) -> Decision | None:
        """The decision for one request, or None when nothing limits it (an unknown or invalid
        credential, a run token, a capability without a limit)."""
        try:
            finder = _credential_finder(self.authenticator, credential)
            if finder is None:
                return None
            account, own = await self.ledger.db.run(
                lambda tx: (lambda account: (account, read_limits(tx, account.id)))(finder(tx)),
                write=False,
            )
        except KilnError:  # never tell whether a credential exists: the route answers its 401
            return None
        rpm = self.policy.rpm(account, own, capability)
        if not rpm:
            return None
        return await self.counter.hit(account.id, capability, rpm, cost)


def _headers(values: Mapping[str, str]) -> list[rls_pb2.HeaderValue]:
    return [rls_pb2.HeaderValue(key=name, value=value) for name, value in values.items()]


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """``envoy.service.ratelimit.v3.RateLimitService``: every descriptor with a credential and a
    capability is counted; OVER_LIMIT when any is over. The response carries the headers
    and, when over, the body that Envoy sends (the edge builds its own answer from the
    statuses)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        cost = max(1, request.hits_addend)
        counted: list[Decision] = []
        for descriptor in request.descriptors:
            decision = await self._decide(descriptor, cost)
            status = response.statuses.add(code=rls_pb2.RateLimitResponse.OK)
            if decision is None:
                continue
            counted.append(decision)
            status.current_limit.requests_per_unit = decision.limit
            status.current_limit.unit = rls_pb2.RateLimitResponse.RateLimit.MINUTE
            status.limit_remaining = decision.remaining
            status.duration_until_reset.FromNanoseconds(int(decision.reset_seconds * 1e9))
            if not decision.allowed:
                status.code = rls_pb2.RateLimitResponse.OVER_LIMIT
                response.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT
        if counted:
            tightest = min(counted, key=lambda d: (d.allowed, d.remaining))
            response.response_headers_to_add.extend(
                _headers(limit_headers(tightest.limit, tightest.remaining, tightest.reset_seconds))
            )
            if not tightest.allowed:
                refusal = rate_limited(tightest.reset_seconds)
                response.response_headers_to_add.extend(
                    _headers(
                        {
                            **retry_headers(tightest.reset_seconds),
                            "content-type": "application/json",
                        }
                    )
                )
                response.raw_body = envelope_json(refusal.message, ErrorType.RATE_LIMIT)
        return response

    async def _decide(self, descriptor: rls_pb2.RateLimitDescriptor, cost: int) -> Decision | None:
        entries = _entries(descriptor.entries)
        credential, capability = entries.get(CREDENTIAL_KEY), entries.get(CAPABILITY_KEY)
        if not credential or not capability:
            return None
        return await self.limiter.check(credential, capability, cost)


def _entries(entries: Sequence[rls_pb2.RateLimitDescriptor.Entry]) -> dict[str, str]:
    return {entry.key: entry.value for entry in entries}
