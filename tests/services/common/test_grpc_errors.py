"""How a failed gRPC call becomes a Kiln error: a Kiln service's ErrorInfo decides; a status the
transport made (no ErrorInfo) is a fault of the mesh, a 500, whatever its code."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import (
    Conflict,
    ErrorType,
    InvalidRequest,
    KilnError,
    ProcessingError,
    RateLimited,
    UpstreamUnavailable,
)
from services.common.grpc_client import error_from_rpc
from services.common.grpc_server import to_status


def failed_call(
    code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, bytes], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


def from_kiln(err: KilnError) -> grpc.aio.AioRpcError:
    """The failed call a Kiln service's interceptor makes of ``err``."""
    status = to_status(err)
    return failed_call(status.code, status.details, tuple(status.trailing_metadata))


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # e.g. "received metadata size exceeds hard limit"
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
    ],
)
def test_a_status_without_error_info_is_a_processing_error(code: grpc.StatusCode) -> None:
    err = error_from_rpc(failed_call(code, "Stream removed (received metadata size exceeds hard limit)"))
    assert type(err) is ProcessingError and err.mapping.http_status == 500
    assert "metadata" not in err.message  # transport details are not shown to the caller


def test_an_unreachable_or_slow_service_is_upstream_unavailable() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        err = error_from_rpc(failed_call(code, "connection refused"))
        assert isinstance(err, UpstreamUnavailable) and err.mapping.http_status == 500


def test_kiln_errors_cross_grpc_with_their_type_and_status() -> None:
    assert type(error_from_rpc(from_kiln(InvalidRequest("bad")))) is InvalidRequest
    limited = error_from_rpc(from_kiln(RateLimited("slow down")))
    assert limited.error_type is ErrorType.RATE_LIMIT and limited.mapping.http_status == 429
    conflict = error_from_rpc(from_kiln(Conflict("in progress")))
    assert type(conflict) is Conflict and conflict.mapping.http_status == 409
