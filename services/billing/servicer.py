"""The gRPC face of billing (``kiln.billing.v1.BillingService``).

It checks requests and converts protobuf to ledger types and back; the rules
live in :mod:`services.billing.ledger`, :mod:`services.billing.pricing` and
:mod:`services.billing.auth`. Errors are raised as ``KilnError`` and become
rich statuses in the server's interceptor.

Authorize is the hot path (once per billed request): maintenance flag
(cached), a JWT check when the credential is one, then one transaction that
finds the account, checks its idempotency key, prices the work for it and
holds the total. Commit prices the work actually done with the same
function (:func:`~services.billing.pricing.quote`), capped at the hold: the
caller reports usage, never an amount. With rate limits, the same transaction
refuses a synchronous request past the account's jobs in flight
(:mod:`services.billing.rate_limits`).

SignIn and SignOut make and end sign-in sessions (:mod:`services.billing.sessions`);
a session token is the third kind of credential, beside API keys and JWTs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from kiln.billing.v1 import billing_service_pb2 as pb
from kiln.billing.v1 import billing_service_pb2_grpc as pb_grpc
from services.billing.auth import Authenticator
from services.billing.ledger import (
    AccountFinder,
    AccountRecord,
    Authorization,
    IdempotencyClaim,
    Ledger,
    MediaRecord,
    ReservationRecord,
    StoredAnswer,
)
from services.billing.metrics import CreditMetrics
from services.billing.pricing import ImageGenerationItem, quote
from services.billing.rate_limits import RateLimitPolicy
from services.billing.sessions import SessionRecord, Sessions
from services.billing.store import Tx
from services.billing.tasks import TaskStore, is_run_token
from services.common.errors import AuthenticationFailed, InvalidRequest, MaintenanceMode
from services.common.registry import Registry

#: Longest time to live a caller may ask for a hold.
MAX_TTL_SECONDS = 24 * 3600

_STATES = {
    "held": pb.RESERVATION_STATE_HELD,
    "committed": pb.RESERVATION_STATE_COMMITTED,
    "released": pb.RESERVATION_STATE_RELEASED,
    "expired": pb.RESERVATION_STATE_EXPIRED,
}


def account_pb(account: AccountRecord) -> pb.Account:
    return pb.Account(
        id=account.id,
        name=account.name,
        premium=account.premium,
        balance_hundredths=account.balance,
        held_hundredths=account.held,
    )


def reservation_pb(res: ReservationRecord) -> pb.Reservation:
    return pb.Reservation(
        id=res.id,
        account_id=res.account_id,
        request_id=res.request_id,
        amount_hundredths=res.amount,
        charged_hundredths=res.charged,
        state=_STATES[res.state],
        expires_at_ms=res.expires_at_ms,
    )


def session_pb(session: SessionRecord) -> pb.Session:
    return pb.Session(
        user_name=session.user_name,
        user_id=session.user_id,
        created_at_ms=session.created_at_ms,
        expires_at_ms=session.expires_at_ms,
    )


def usage_items(usages: Sequence[pb.Usage], *, done: bool = False) -> list[ImageGenerationItem]:
    """The ledger-side form of the request's usage items.

    ``done``: the usage of Commit, the work actually done. It may be empty, and
    a segmentation item may have 0 frames (nothing found): both cost nothing.
    """
    if not usages and not done:
        raise InvalidRequest("'usage' must list at least one item to price.")
    items: list[ImageGenerationItem] = []
    for index, usage in enumerate(usages):
        kind = usage.WhichOneof("kind")
        if kind in ("image_generation", "image_edit"):
            work = getattr(usage, kind)
            items.append(
                ImageGenerationItem(
                    model=work.model, width=work.width, height=work.height, steps=work.steps, count=work.count
                )
            )
        elif kind in ("chat", "speech", "music", "video"):
            items.append(ImageGenerationItem(model=getattr(usage, kind).model))
        elif kind == "upscale":
            up = usage.upscale
            items.append(ImageGenerationItem(model=up.model, width=up.output_width, height=up.output_height))
        elif kind == "segmentation":
            if done and usage.segmentation.frames == 0:
                continue
            if usage.segmentation.frames < 1:
                raise InvalidRequest(f"usage[{index}]: 'frames' must be at least 1.")
            items.append(ImageGenerationItem(model=usage.segmentation.model, count=usage.segmentation.frames))
        else:
            raise InvalidRequest(f"usage[{index}] names no kind of work.")
    return items


def stored_response_pb(answer: StoredAnswer) -> pb.StoredResponse:
    return pb.StoredResponse(
        status=answer.status,
        headers=[pb.Header(name=name, value=value) for name, value in answer.headers],
        body=answer.body,
        body_media_id=answer.body_media_id,
    )


def _bearer(credential: pb.Credential) -> str:
    return credential.bearer_token.strip() if credential.WhichOneof("kind") == "bearer_token" else ""


def _require(value: str, name: str) -> str:
    if not value:
        raise InvalidRequest(f"'{name}' is required.")
    return value


class BillingServicer(pb_grpc.BillingServiceServicer):
    """Implements every RPC of ``kiln.billing.v1.BillingService``."""

    def __init__(
        self,
        ledger: Ledger,
        registry: Registry,
        authenticator: Authenticator,
        *,
        default_ttl_seconds: int,
        tasks: TaskStore | None = None,
        credits: CreditMetrics | None = None,
        limits: RateLimitPolicy | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.ledger = ledger
        #: Users, sign-in and sessions (SignIn, SignOut, session credentials).
        self.sessions = sessions or Sessions(ledger)
        self.registry = registry
        self.authenticator = authenticator
        self.default_ttl_seconds = default_ttl_seconds
        self.tasks = tasks or TaskStore(ledger)
        #: Credits held, charged and returned (``services.billing.metrics``).
        self.credits = credits or CreditMetrics()
        #: Jobs in flight: a synchronous request's hold is refused (429) past the account's limit.
        self.concurrency_check = limits.concurrency_check(ledger.now_ms) if limits is not None else None

    def _ttl(self, ttl_seconds: int) -> int:
        if ttl_seconds < 0 or ttl_seconds > MAX_TTL_SECONDS:
            raise InvalidRequest(f"'ttl_seconds' must be between 0 and {MAX_TTL_SECONDS}.")
        return ttl_seconds or self.default_ttl_seconds

    def _finder(self, credential: pb.Credential) -> AccountFinder:
        kind = credential.WhichOneof("kind")
        if kind == "api_key":
            return self.authenticator.finder(api_key=credential.api_key)
        if kind == "bearer_token":
            return self.authenticator.finder(bearer_token=credential.bearer_token)
        if kind == "session_token":
            return self.authenticator.finder(session_token=credential.session_token)
        raise AuthenticationFailed()

    async def _check_maintenance(self) -> None:
        if await self.ledger.maintenance():
            raise MaintenanceMode()

    async def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthorizeResponse:
        items = usage_items(request.usage)
        ttl = self._ttl(request.ttl_seconds)
        claim = None
        if request.HasField("idempotency"):
            key = request.idempotency
            _require(key.fingerprint, "idempotency.fingerprint")
            claim = IdempotencyClaim(key.key, key.fingerprint, key.streamed)
        outcome = await self.authorize(request.credential, items, request.request_id, ttl, claim)
        response = pb.AuthorizeResponse(
            account=account_pb(outcome.account), item_amounts_hundredths=outcome.amounts
        )
        if outcome.reservation is not None:
            response.reservation.CopyFrom(reservation_pb(outcome.reservation))
        if outcome.replay is not None:
            response.replay.CopyFrom(stored_response_pb(outcome.replay))
        return response

    async def authorize(
        self,
        credential: pb.Credential,
        items: list[ImageGenerationItem],
        request_id: str,
        ttl: float,
        claim: IdempotencyClaim | None,
        then: Callable[[Tx, AccountRecord, ReservationRecord], None] | None = None,
    ) -> Authorization:
        """Authorize's work (CreateTask's too, which queues its task with ``then``). A task's
        run token (a run replaying its task's request) gets the task's own hold instead."""
        await self._check_maintenance()
        if then is None and is_run_token(_bearer(credential)):
            return await self.tasks.run_authorization(_bearer(credential))  # the task's hold: not new
        outcome = await self.ledger.authorize(
            self._finder(credential),
            lambda account: quote(items, self.registry, premium=account.premium),
            request_id,
            ttl,
            claim,
            then or self.concurrency_check,  # a task (``then`` queues it) waits in its queue instead
        )
        if outcome.reservation is not None:
            self.credits.hold(outcome.reservation.amount)
        return outcome

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthenticateResponse:
        await self._check_maintenance()
        token = _bearer(request.credential)
        if is_run_token(token):
            account = (await self.tasks.run_authorization(token)).account
        elif request.credential.WhichOneof("kind") == "session_token":
            account, session = await self.sessions.authenticate(request.credential.session_token.strip())
            return pb.AuthenticateResponse(account=account_pb(account), session=session_pb(session))
        else:
            account = await self.ledger.find_account(self._finder(request.credential))
        return pb.AuthenticateResponse(account=account_pb(account))

    async def SignIn(self, request: pb.SignInRequest, context: grpc.aio.ServicerContext) -> pb.SignInResponse:
        await self._check_maintenance()
        signed_in = await self.sessions.sign_in(request.name, request.password, request.client_address)
        return pb.SignInResponse(
            account=account_pb(signed_in.account),
            session=session_pb(signed_in.session),
            session_token=signed_in.token,
            csrf_token=signed_in.csrf_token,
        )

    async def SignOut(
        self, request: pb.SignOutRequest, context: grpc.aio.ServicerContext
    ) -> pb.SignOutResponse:
        return pb.SignOutResponse(revoked=await self.sessions.sign_out(request.session_token.strip()))

    async def Quote(self, request: pb.QuoteRequest, context: grpc.aio.ServicerContext) -> pb.QuoteResponse:
        items = usage_items(request.usage)
        premium = False
        if request.account_id:
            premium = (await self.ledger.get_account(request.account_id)).premium
        amounts = quote(items, self.registry, premium=premium)
        return pb.QuoteResponse(amount_hundredths=sum(amounts), item_amounts_hundredths=amounts)

    async def Reserve(
        self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveResponse:
        _require(request.account_id, "account_id")
        if request.amount_hundredths < 0:
            raise InvalidRequest("'amount_hundredths' must not be negative.")
        reservation = await self.ledger.reserve(
            request.account_id, request.amount_hundredths, request.request_id, self._ttl(request.ttl_seconds)
        )
        self.credits.hold(reservation.amount)
        return pb.ReserveResponse(reservation=reservation_pb(reservation))

    async def Commit(self, request: pb.CommitRequest, context: grpc.aio.ServicerContext) -> pb.CommitResponse:
        _require(request.reservation_id, "reservation_id")
        items = usage_items(request.usage, done=True)
        media = tuple(media_record(record) for record in request.media)

        def price(account: AccountRecord) -> int:
            return sum(quote(items, self.registry, premium=account.premium)) if items else 0

        reservation = await self.ledger.commit(request.reservation_id, price, media)
        self.credits.commit(reservation.amount, reservation.charged)
        return pb.CommitResponse(reservation=reservation_pb(reservation))

    async def GetReservation(
        self, request: pb.GetReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReservationResponse:
        _require(request.reservation_id, "reservation_id")
        reservation = await self.ledger.get_reservation(request.reservation_id)
        return pb.GetReservationResponse(reservation=reservation_pb(reservation))

    async def SaveResponse(
        self, request: pb.SaveResponseRequest, context: grpc.aio.ServicerContext
    ) -> pb.SaveResponseResponse:
        _require(request.reservation_id, "reservation_id")
        stored = request.response
        if not 100 <= stored.status <= 599:
            raise InvalidRequest("'response.status' must be an HTTP status (100-599).")
        answer = StoredAnswer(
            status=stored.status,
            headers=tuple((h.name, h.value) for h in stored.headers),
            body=stored.body,
            body_media_id=stored.body_media_id,
        )
        saved = await self.ledger.save_response(request.reservation_id, answer)
        return pb.SaveResponseResponse(saved=saved)

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        _require(request.reservation_id, "reservation_id")
        if await self.tasks.holds(request.reservation_id):
            # A queued or running task's hold: a failed run of it does not end the task (it may
            # be retried); the task releases its hold when it ends.
            reservation = await self.ledger.get_reservation(request.reservation_id)
        else:
            reservation = await self.ledger.release(request.reservation_id)
            if reservation.state == "released":
                self.credits.release(reservation.amount)
        return pb.ReleaseResponse(reservation=reservation_pb(reservation))

    async def GetAccount(
        self, request: pb.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAccountResponse:
        _require(request.account_id, "account_id")
        account = await self.ledger.get_account(request.account_id)
        return pb.GetAccountResponse(account=account_pb(account))

    async def ListMedia(
        self, request: pb.ListMediaRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMediaResponse:
        _require(request.kind, "kind")
        account = await self.ledger.find_account(self._finder(request.credential))
        records, total = await self.ledger.list_media(
            account.id,
            request.kind,
            sort_by=request.sort_by or "created_at",
            ascending=request.ascending,
            limit=request.limit or 20,
            offset=request.offset,
        )
        return pb.ListMediaResponse(
            media=[
                pb.MediaRecord(
                    media_id=r.media_id,
                    kind=r.kind,
                    mime_type=r.mime_type,
                    model=r.model,
                    prompt=r.prompt,
                    width=r.width,
                    height=r.height,
                    frames=r.frames,
                    fps=r.fps,
                    duration_seconds=r.duration_seconds,
                    size_bytes=r.size_bytes,
                    created_at_ms=r.created_at_ms,
                )
                for r in records
            ],
            total=total,
        )

    async def SweepMedia(
        self, request: pb.SweepMediaRequest, context: grpc.aio.ServicerContext
    ) -> pb.SweepMediaResponse:
        if request.created_before_ms <= 0:
            raise InvalidRequest("'created_before_ms' must be a positive Unix time in ms.")
        expired, unrecorded = await self.ledger.sweep_media(
            request.created_before_ms,
            tuple(request.keep_kinds),
            limit=request.limit or 500,
            candidates=tuple(request.candidate_media_ids),
        )
        return pb.SweepMediaResponse(expired_media_ids=expired, unrecorded_media_ids=unrecorded)


def media_record(record: pb.MediaRecord) -> MediaRecord:
    _require(record.media_id, "media.media_id")
    _require(record.kind, "media.kind")
    _require(record.mime_type, "media.mime_type")
    return MediaRecord(
        media_id=record.media_id,
        kind=record.kind,
        mime_type=record.mime_type,
        model=record.model,
        prompt=record.prompt,
        width=record.width,
        height=record.height,
        frames=record.frames,
        fps=record.fps,
        duration_seconds=record.duration_seconds,
        size_bytes=record.size_bytes,
    )


#: The name the brief gives the servicer.
BillingServiceServicer = BillingServicer
