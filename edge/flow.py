"""The billed request flow every paid route shares.

authenticate + quote + reserve (one billing call) -> the work (capability
call, media store) -> commit the actual cost; on any failure or cancellation
after the reservation, release it. A request that fails is not charged, and a
crash between the two calls costs nothing either: the hold expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web

from edge.keys import REQUEST_ID, UPSTREAMS
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from services.common.errors import AuthenticationFailed, KilnError

log = logging.getLogger("kiln.edge")
R = TypeVar("R")


def credential_from(request: web.Request) -> billing_pb.Credential:
    """``X-API-Key: <key>`` or ``Authorization: Bearer <key or JWT>``."""
    api_key = request.headers.get("X-API-Key", "").strip()
    if api_key:
        return billing_pb.Credential(api_key=api_key)
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return billing_pb.Credential(bearer_token=token.strip())
    raise AuthenticationFailed()


@dataclass
class Billed(Generic[R]):
    """What a billed piece of work returns: its result and what it actually cost."""

    result: R
    charged: int
    #: Files the work produced, recorded for the account with the charge (the user's library).
    media: tuple[billing_pb.MediaRecord, ...] = ()


async def run_billed(
    request: web.Request,
    usage: list[billing_pb.Usage],
    work: Callable[[billing_pb.AuthorizeResponse], Awaitable[Billed[R]]],
) -> Billed[R]:
    """Reserves the price of `usage`, runs `work`, commits what it reports as charged."""
    upstreams = request.app[UPSTREAMS]
    request_id = request[REQUEST_ID]
    credential = credential_from(request)
    auth = await upstreams.billing.authorize(credential, usage, request_id)
    reservation_id = auth.reservation.id
    try:
        billed = await work(auth)
        await upstreams.billing.commit(reservation_id, billed.charged, request_id, billed.media)
    except BaseException:
        await asyncio.shield(_release(request, reservation_id))
        raise
    return billed


async def _release(request: web.Request, reservation_id: str) -> None:
    try:
        await request.app[UPSTREAMS].billing.release(reservation_id, request[REQUEST_ID])
    except KilnError as err:  # the hold expires on its own; say so and go on
        log.warning("release of %s failed (%s); it will expire", reservation_id, err.message)
