"""POST /v1/chat/completions with the official openai package and raw SSE."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from services.llm.server import AUTO_CHAT_BATCH
from tests.conftest import Mesh, balance, new_customer
from tests.edge.images_util import b64, png_bytes

CHAT = "/v1/chat/completions"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QWEN = "Qwen/Qwen3.5-4B"
PREMIUM_MESSAGE = "This endpoint requires a premium subscription. Please upgrade to access LLM generation with vision support."


@pytest.fixture(scope="module", autouse=True)
async def smollm2_loaded(mesh: Mesh) -> None:
    """SmolLM2 loads after the default model (its GGUF is converted on first start): wait for it."""
    customer = await new_customer(mesh, "0", premium=True)
    body = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with aiohttp.ClientSession() as http:
        for _ in range(1200):
            async with http.post(mesh.url + CHAT, json=body, headers=customer.headers) as response:
                if response.status != 503:
                    assert response.status == 200, await response.text()
                    return
            await asyncio.sleep(0.25)
    raise AssertionError("SmolLM2 did not load")


async def client_for(mesh: Mesh, premium: bool = True) -> Any:
    from openai import AsyncOpenAI

    customer = await new_customer(mesh, "5", premium=premium)
    return customer, AsyncOpenAI(api_key=customer.key, base_url=mesh.url + "/v1", max_retries=0)


async def test_a_real_small_model_answers_sensibly_and_premium_pays_nothing(mesh: Mesh) -> None:
    customer, client = await client_for(mesh)
    answer = await client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert answer.object == "chat.completion" and answer.model == SMOL
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert (
        usage
        and usage.prompt_tokens > 0
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )
    assert await balance(mesh, customer.account_id) == 500
    reservations = await mesh.ledger.ledger_entries(customer.account_id)  # type: ignore[attr-defined]
    assert all(entry.kind == "grant" for entry in reservations)  # premium: recorded at 0, no charges
    await client.close()


async def test_streaming_sends_role_then_deltas_then_finish_then_usage(mesh: Mesh) -> None:
    _, client = await client_for(mesh)
    stream = await client.chat.completions.create(
        model=SMOL,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a colour."},
        ],
        stream=True,
        max_tokens=5,
        temperature=0,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    await client.close()


async def test_vision_goes_to_the_vlm_and_is_refused_by_the_text_model(mesh: Mesh) -> None:
    _, client = await client_for(mesh)
    content = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png_bytes(64, 48))}"}},
    ]
    answer = await client.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": content}], max_tokens=4
    )
    assert answer.model == QWEN and answer.usage and answer.usage.prompt_tokens > 10
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as info:
        await client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": content}])
    assert "does not support vision" in str(info.value)
    await client.close()


async def test_non_premium_accounts_get_the_contract_403(mesh: Mesh) -> None:
    customer, client = await client_for(mesh, premium=False)
    from openai import PermissionDeniedError

    with pytest.raises(PermissionDeniedError) as info:
        await client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "hi"}])
    assert PREMIUM_MESSAGE in str(info.value)
    assert await balance(mesh, customer.account_id) == 500
    await client.close()


#: Tokens each abandoned stream asks for. Greedy SmolLM2 tells its "long story" in a loop
#: until the limit (measured: 500 tokens, finish "length"), and a batched step of eight
#: takes ~0.2 s on a 2-core CPU: were the slots never freed, a wave would hold them for
#: some two minutes, far longer than ADMIT_SECONDS.
ABANDONED_MAX_TOKENS = 600
#: How long a wave of streams, or the request after them, may wait for a slot.
ADMIT_SECONDS = 30


async def reservations(mesh: Mesh, account_id: str) -> dict[str, tuple[str, int]]:
    """request id -> (state, units charged) of the account's holds (a premium account
    holds 0, so its holds show in no balance and no ledger row: only here)."""
    ledger: Any = mesh.ledger
    rows = await ledger.db.run(
        lambda tx: tx.all(
            "SELECT request_id, state, charged FROM reservations WHERE account_id = ?", (account_id,)
        ),
        write=False,
    )
    return {str(request_id): (str(state), int(charged)) for request_id, state, charged in rows}


async def test_clients_that_leave_mid_stream_free_every_slot_and_are_not_charged(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    slots = mesh.settings.batch_max_size or AUTO_CHAT_BATCH  # requests the llm service decodes at once
    customer = await new_customer(mesh, "5", premium=True)
    before = await balance(mesh, customer.account_id)
    body = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "stream": True,
        "max_tokens": ABANDONED_MAX_TOKENS,
        "temperature": 0,
    }

    opened: list[aiohttp.ClientResponse] = []

    async def open_stream(request_id: str) -> None:
        headers = {**customer.headers, "X-Request-ID": request_id}
        response = await http.post(mesh.url + CHAT, json=body, headers=headers)
        opened.append(response)
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert (await response.content.readline()).startswith(b"data: ")  # generating: it holds a slot

    # Two waves that each take every slot: the second is only admitted if the first's
    # abandoned streams gave their slots back.
    abandoned = [f"abandoned-{wave}-{i}" for wave in range(2) for i in range(slots)]
    try:
        for wave in (abandoned[:slots], abandoned[slots:]):
            try:
                async with asyncio.timeout(ADMIT_SECONDS):
                    await asyncio.gather(*(open_stream(request_id) for request_id in wave))
            except TimeoutError:
                raise AssertionError(
                    f"{wave[0]}..{wave[-1]} were not all admitted within {ADMIT_SECONDS} s: "
                    "abandoned streams still hold their slots"
                ) from None
            for response in opened:
                response.close()  # gone, mid-stream
    finally:
        for response in opened:
            response.close()

    short = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 3,
        "temperature": 0,
    }
    async with asyncio.timeout(ADMIT_SECONDS):
        async with http.post(mesh.url + CHAT, json=short, headers=customer.headers) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["choices"][0]["finish_reason"] == "length"

    async with asyncio.timeout(ADMIT_SECONDS):  # the edge releases each hold once it sees the client gone
        while True:
            holds = await reservations(mesh, customer.account_id)
            if all(state != "held" for state, _ in holds.values()):
                break
            await asyncio.sleep(0.1)
    assert {request_id: holds[request_id] for request_id in abandoned} == {
        request_id: ("released", 0) for request_id in abandoned
    }
    ledger: Any = mesh.ledger
    assert (await ledger.get_account(customer.account_id)).held == 0
    assert await balance(mesh, customer.account_id) == before
    assert [entry.kind for entry in await ledger.ledger_entries(customer.account_id)] == ["grant"]


BAD = [
    ({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}, "Invalid model ID 'gpt-x'"),
    ({"messages": []}, "'messages' must hold at least one message"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "Invalid value for 'messages[0].role'"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "Invalid value for 'temperature'"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "Invalid value for 'top_p'"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "Only n=1 is supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "up to 4"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "tools": []},
        "Unrecognized request argument supplied: tools",
    ),
    (
        {
            "model": QWEN,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://127.0.0.1/cat.png"}}],
                }
            ],
        },
        "loopback address",
    ),
    (
        {
            "model": QWEN,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://169.254.169.254/latest"}}
                    ],
                }
            ],
        },
        "link-local (cloud metadata)",
    ),
    (
        {
            "model": QWEN,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
                }
            ],
        },
        "only data: URLs and https:// URLs",
    ),
    ({"model": SMOL, "messages": [{"role": "user", "content": "word " * 9000}]}, "prompt too long"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m[:30] for _, m in BAD])
async def test_bad_chats_are_400(
    mesh: Mesh, http: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    customer = await new_customer(mesh, "5", premium=True)
    async with http.post(mesh.url + CHAT, json=body, headers=customer.headers) as response:
        payload = await response.json()
        assert response.status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error"
    assert message in payload["error"]["message"]
