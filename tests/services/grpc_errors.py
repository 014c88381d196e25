"""Assertions on the capability services' refusals: INVALID_ARGUMENT carrying the contract's
``invalid_request_error`` ``ErrorInfo``, as every servicer's error interceptor sends them."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.errors import ErrorType, InvalidRequest
from services.common.grpc_client import error_from_rpc


def assert_invalid_request(err: grpc.aio.AioRpcError, message: str | None = None) -> InvalidRequest:
    """``err`` is an invalid request (its message ``message`` when given); the error it maps back to."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert [i.reason for i in infos] == ["invalid_request_error"]
    error = error_from_rpc(err)
    assert isinstance(error, InvalidRequest)
    assert error.error_type is ErrorType.INVALID_REQUEST
    if message is not None:
        assert error.message == message
    return error


async def expect_invalid(call: Awaitable[Any], *words: str) -> str:
    """Awaits a call that must fail as an invalid request whose details hold every one of ``words``."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert_invalid_request(caught.value)
    details = caught.value.details() or ""
    for word in words:
        assert word in details, details
    return details
