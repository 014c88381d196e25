"""Envoy's global rate-limit filter against billing's limiter (KILN_RATE_LIMIT_ENVOY): the config
``kiln envoy-config`` writes validates, and Envoy in front of billing and the edge answers an
over-the-limit request with the limiter's 429 (the contract's envelope and headers)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

from kiln_cli.envoy import build_descriptor_set, render_envoy_config
from kiln_cli.main import free_port
from tests.stack import books, offline_stack
from tests.test_envoy import start_envoy

GENERATE = "/v1/images/generations"
BODY = {"prompt": "a kiln", "size": "256x256"}


async def test_envoy_limits_with_billing_s_limiter(tmp_path: Path) -> None:
    async with offline_stack(
        tmp_path / "data",
        rate_limit_rpm=1,
        rate_limit_envoy=True,
        rate_limit_key_prefix=f"kiln-test-{secrets.token_hex(6)}",
    ) as running:
        edge = urlparse(running.url)
        settings = running.edge.settings.model_copy(
            update={"http_host": edge.hostname, "http_port": edge.port}
        )
        public_port, admin_port = free_port(), free_port()
        config = render_envoy_config(
            settings,
            descriptor=build_descriptor_set(tmp_path / "kiln.binpb"),
            public_host="127.0.0.1",
            public_port=public_port,
            services_port=free_port(),
            admin_port=admin_port,
        )
        [limit_filter] = [
            f
            for f in config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
                "typed_config"
            ]["http_filters"]
            if f["name"] == "envoy.filters.http.ratelimit"
        ]
        assert limit_filter["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"][
            "cluster_name"
        ] == ("billing")
        process = await start_envoy(config, tmp_path, public_port)
        try:
            account_id, headers = await running.customer("10")
            async with aiohttp.ClientSession() as http:
                async with asyncio.timeout(60):
                    while True:
                        try:
                            async with http.get(f"http://127.0.0.1:{admin_port}/ready") as response:
                                if response.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.1)
                url = f"http://127.0.0.1:{public_port}{GENERATE}"
                async with http.post(url, json=BODY, headers=headers) as response:
                    assert response.status == 500  # counted, let through; no image service runs
                    assert response.headers["x-ratelimit-limit-requests"] == "1"
                    assert response.headers["x-ratelimit-remaining-requests"] == "0"
                async with http.post(url, json=BODY, headers=headers) as response:
                    assert response.status == 429
                    error = (await response.json())["error"]
                    seconds = response.headers["Retry-After"]
                    assert error["type"] == "rate_limit_error"
                    assert error["message"] == (
                        f"You have been ratelimited, this temporary restriction will be lifted in: {seconds} seconds"
                    )
                    assert int(response.headers["retry-after-ms"]) > 0
                    assert response.headers["x-ratelimit-remaining-requests"] == "0"
            state = await books(running.ledger, account_id)
            assert (state.balance, state.held) == (1000, 0)
        finally:
            process.terminate()
            await process.wait()
