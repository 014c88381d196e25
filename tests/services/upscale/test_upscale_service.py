"""UpscaleImage over a real gRPC server: sizes, quality on real weights, tiling,
concurrency and batching, output formats, and every kind of bad input."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from kiln.common.v1 import media_pb2
from kiln.upscale.v1 import upscale_service_pb2 as pb
from services.upscale.engines import NetworkEngine
from services.upscale.servicer import SERVICE_NAME
from tests.services.grpc_errors import expect_invalid
from tests.services.upscale.conftest import TILED_METHOD, Upscale
from tests.services.upscale.util import decode, noise, picture, png, psnr

#: Every method with every scale it accepts (0: the method's own).
SCALES = {
    "realesrgan_4x": (0, 4),
    "realesrgan_2x": (0, 2),
    "realesrgan_4x_anime": (0, 4),
    "swin2sr": (0, 2, 3, 4),
    "lanczos": (0, 2, 3, 4, 5, 6, 7, 8),
}
OWN_SCALE = {"realesrgan_4x": 4, "realesrgan_2x": 2, "realesrgan_4x_anime": 4, "swin2sr": 2, "lanczos": 2}


async def test_health_serving_and_reflection_lists_the_service(ups: Upscale) -> None:
    answer = await ups.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ups.channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        assert SERVICE_NAME in names
        break


@pytest.mark.parametrize(("method", "scale"), [(m, s) for m, scales in SCALES.items() for s in scales])
async def test_output_size_is_input_times_scale(ups: Upscale, method: str, scale: int) -> None:
    source = noise(13, 10, seed=scale)
    reply = await ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=png(source), method=method, scale=scale))
    factor = scale or OWN_SCALE[method]
    out = decode(reply.image.data)
    assert out.size == (13 * factor, 10 * factor)
    assert (reply.image.width, reply.image.height) == out.size
    assert reply.image.mime_type == "image/png" and out.format == "PNG"
    assert reply.method == method and reply.scale == factor
    expected = "pillow" if method == "lanczos" else "onnxruntime:CPUExecutionProvider"
    assert reply.backend == expected
    assert reply.batch_size >= 1
    if method != "swin2sr":  # the tiny Swin2SR has random weights: its pixels mean nothing
        # The output still shows its input: close to a Lanczos enlargement of it.
        reference = source.resize(out.size, Image.Resampling.LANCZOS)
        assert psnr(out, reference) > 15


@pytest.mark.parametrize("method", ["realesrgan_4x", "realesrgan_4x_anime"])
async def test_real_weights_beat_bicubic(ups: Upscale, method: str) -> None:
    high = picture(192)
    low = high.resize((48, 48), Image.Resampling.BICUBIC)
    reply = await ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=png(low), method=method))
    restored = decode(reply.image.data)
    bicubic = low.resize(high.size, Image.Resampling.BICUBIC)
    assert restored.size == high.size
    assert psnr(restored, high) > psnr(bicubic, high) + 0.5


async def test_realesrgan_2x_is_the_4x_network_then_lanczos(ups: Upscale) -> None:
    low = picture(192).resize((32, 32), Image.Resampling.BICUBIC)
    four = await ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=png(low), method="realesrgan_4x"))
    two = await ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=png(low), method="realesrgan_2x"))
    expected = decode(four.image.data).resize((64, 64), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(decode(two.image.data), dtype=int) - np.asarray(expected, dtype=int))
    assert diff.max() <= 2


async def test_tiled_output_matches_untiled(ups: Upscale) -> None:
    source = picture(384).resize((96, 80), Image.Resampling.BICUBIC)
    tiled_engine = ups.pool.get(TILED_METHOD)
    assert isinstance(tiled_engine, NetworkEngine)
    items_before = tiled_engine.batch_stats.items
    whole = await ups.stub.UpscaleImage(
        pb.UpscaleImageRequest(image=png(source), method="realesrgan_4x_anime")
    )
    tiled = await ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=png(source), method=TILED_METHOD))
    # 48 px tiles, stride 32: columns at 0, 32, 48 and rows at 0, 32, all batched together.
    assert tiled_engine.batch_stats.items - items_before == 6
    assert tiled.batch_size == 1  # one request's tiles
    a = np.asarray(decode(whole.image.data), dtype=np.float64)
    b = np.asarray(decode(tiled.image.data), dtype=np.float64)
    assert a.shape == b.shape == (80 * 4, 96 * 4, 3)
    diff = np.abs(a - b)
    assert diff.mean() < 1.0, diff.mean()
    assert np.percentile(diff, 99) < 8, np.percentile(diff, 99)  # the rest: context lost at tile edges
    assert psnr(decode(whole.image.data), decode(tiled.image.data)) > 42


async def test_concurrent_requests_come_back_to_the_right_callers(ups: Upscale) -> None:
    sources = [noise(20 + i % 3, 16, seed=100 + i) for i in range(8)]
    engine = ups.pool.get("realesrgan_4x_anime")
    assert isinstance(engine, NetworkEngine)
    batches_before = engine.batch_stats.batches

    def call(image: Image.Image):  # type: ignore[no-untyped-def]
        return ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=png(image), method="realesrgan_4x_anime"))

    together = await asyncio.gather(*(call(image) for image in sources))
    concurrent_batches = engine.batch_stats.batches - batches_before
    assert concurrent_batches <= len(sources)
    alone = [await call(image) for image in sources]
    for i, (pair, solo) in enumerate(zip(together, alone, strict=True)):
        got, own = decode(pair.image.data), decode(solo.image.data)
        assert got.size == (sources[i].width * 4, 64)
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(own, dtype=int)).max() <= 2
        for j, other in enumerate(alone):
            if j != i and decode(other.image.data).size == got.size:
                assert psnr(got, decode(other.image.data)) < psnr(got, own) - 10


async def test_output_formats_and_alpha(ups: Upscale) -> None:
    rgba = noise(12, 12, seed=7).convert("RGBA")
    alpha = Image.linear_gradient("L").resize((12, 12))
    rgba.putalpha(alpha)
    reply = await ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=png(rgba), method="swin2sr", scale=2))
    out = decode(reply.image.data)
    assert out.mode == "RGBA" and out.size == (24, 24)
    expected_alpha = np.asarray(alpha.resize((24, 24), Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(np.asarray(out.getchannel("A"), dtype=int) - expected_alpha).max() <= 1
    for fmt, mime, name in (
        (media_pb2.IMAGE_FORMAT_JPEG, "image/jpeg", "JPEG"),
        (media_pb2.IMAGE_FORMAT_WEBP, "image/webp", "WEBP"),
    ):
        reply = await ups.stub.UpscaleImage(
            pb.UpscaleImageRequest(image=png(rgba), method="lanczos", scale=3, output_format=fmt)
        )
        out = decode(reply.image.data)
        assert reply.image.mime_type == mime and out.format == name and out.size == (36, 36)


async def test_bad_input_is_invalid_argument(ups: Upscale) -> None:
    good = png(noise(8, 8, seed=1))
    call = ups.stub.UpscaleImage
    await expect_invalid(call(pb.UpscaleImageRequest(image=b"not an image", method="lanczos")), "image")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good[:40], method="lanczos")))
    await expect_invalid(call(pb.UpscaleImageRequest(image=b"", method="lanczos")), "empty")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good, method="nearest")), "Supported methods")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good)), "method")
    line = png(Image.new("RGB", (1, 100000), (10, 20, 30)))
    for method in ("realesrgan_4x", "lanczos", "swin2sr"):
        await expect_invalid(call(pb.UpscaleImageRequest(image=line, method=method)), "exceeds")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good, method="realesrgan_4x", scale=2)), "4 only")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good, method="realesrgan_2x", scale=4)), "2 only")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good, method="lanczos", scale=9)), "2 to 8")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good, method="swin2sr", scale=5)), "2 to 4")
    await expect_invalid(call(pb.UpscaleImageRequest(image=good, method="lanczos", scale=-2)), "scale")
    await expect_invalid(
        call(pb.UpscaleImageRequest(image=good, method="realesrgan_4x", face_enhance=True)), "face"
    )
    await expect_invalid(call(pb.UpscaleImageRequest(image=good, method="lanczos", output_format=42)))  # type: ignore[arg-type]


async def test_a_gif_or_oversized_file_is_refused(ups: Upscale) -> None:
    gif = decode(png(noise(8, 8, seed=2)))
    import io

    buf = io.BytesIO()
    gif.save(buf, format="GIF")
    await expect_invalid(
        ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=buf.getvalue(), method="lanczos"))
    )
    too_big = b"\x89PNG" + b"\x00" * (ups.settings.max_input_image_bytes + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ups.stub.UpscaleImage(pb.UpscaleImageRequest(image=too_big, method="lanczos"))
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
