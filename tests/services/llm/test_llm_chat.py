"""The llm service over real gRPC: streaming order, sampling, limits, vision, errors, usage."""

from __future__ import annotations

import io
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from kiln.llm.v1 import llm_service_pb2 as pb
from services.llm.servicer import SERVICE_NAME
from tests.services.grpc_errors import assert_invalid_request

from .conftest import (
    QWEN,
    SMALL_CONTEXT,
    SMOLLM2,
    SMOLLM2_TRANSFORMERS,
    Llm,
    chat_request,
    collect,
    text_message,
)


def png(width: int = 96, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def image_message(text: str, data: bytes) -> pb.ChatMessage:
    return pb.ChatMessage(
        role="user", content=[pb.ContentPart(text=text), pb.ContentPart(image=pb.ImageInput(data=data))]
    )


async def test_health_is_serving_with_the_default_model(llm: Llm) -> None:
    reply = await llm.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_stream_is_start_then_deltas_then_end(llm: Llm) -> None:
    answer = await collect(llm.stub, chat_request("Describe the sea.", model="qwen3.5", max_tokens=6))
    kinds = [e.WhichOneof("event") for e in answer.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) <= {"delta"} and kinds.count("start") == kinds.count("end") == 1
    assert answer.start.model == QWEN  # the alias resolves to the canonical id
    assert answer.end.finish_reason == pb.FINISH_REASON_LENGTH
    assert answer.end.usage.completion_tokens == 6
    assert answer.end.usage.prompt_tokens == answer.start.prompt_tokens
    usage = answer.end.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_greedy_is_deterministic_and_seeded_sampling_repeats(llm: Llm) -> None:
    first = await collect(llm.stub, chat_request("Tell me a story.", model=SMOLLM2, max_tokens=12))
    second = await collect(llm.stub, chat_request("Tell me a story.", model=SMOLLM2, max_tokens=12))
    assert first.text == second.text and first.text
    sampled = [
        await collect(
            llm.stub,
            chat_request(
                "Tell me a story.", model=SMOLLM2, max_tokens=12, temperature=1.2, top_p=0.95, seed=7
            ),
        )
        for _ in range(2)
    ]
    assert sampled[0].text == sampled[1].text


@pytest.mark.parametrize(
    ("model", "resolved"), [("smollm2", SMOLLM2), (SMOLLM2_TRANSFORMERS, SMOLLM2_TRANSFORMERS)]
)
async def test_smollm2_knows_the_capital_of_france(llm: Llm, model: str, resolved: str) -> None:
    """The shipped GGUF on llama.cpp (re-encoded as f16) and dequantised for transformers."""
    answer = await collect(llm.stub, chat_request("What is the capital of France?", model=model))
    assert answer.start.model == resolved
    assert "Paris" in answer.text
    assert answer.end.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("model", [SMOLLM2, SMOLLM2_TRANSFORMERS])
async def test_usage_counts_are_the_tokenizers(llm: Llm, model: str) -> None:
    """Counted with the transformers tokenizer of the same GGUF: llama.cpp's tokens agree."""
    tokenizer = llm.engine(SMOLLM2_TRANSFORMERS).tokenizer
    messages = [
        text_message("system", "You are terse."),
        text_message("user", "What is the capital of France?"),
    ]
    answer = await collect(llm.stub, chat_request(model=model, messages=messages))
    expected_prompt = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    assert answer.start.prompt_tokens == answer.end.usage.prompt_tokens == len(expected_prompt)
    assert answer.end.finish_reason == pb.FINISH_REASON_STOP
    # The answer's tokens plus the end-of-turn token that ended it.
    answer_tokens = tokenizer(answer.text, add_special_tokens=False)["input_ids"]
    assert answer.end.usage.completion_tokens == len(answer_tokens) + 1


async def test_max_tokens_ends_with_length(llm: Llm) -> None:
    answer = await collect(
        llm.stub, chat_request("Write a long poem about the sea.", model=SMOLLM2, max_tokens=5)
    )
    assert answer.end.finish_reason == pb.FINISH_REASON_LENGTH
    assert answer.end.usage.completion_tokens == 5
    assert answer.text


async def test_stop_sequences_are_cut_from_the_answer(llm: Llm) -> None:
    full = await collect(llm.stub, chat_request("What is the capital of France?", model=SMOLLM2))
    assert "Paris" in full.text
    cut = await collect(
        llm.stub, chat_request("What is the capital of France?", model=SMOLLM2, stop=["Paris", "zzz"])
    )
    assert cut.text == full.text[: full.text.index("Paris")]
    assert cut.end.finish_reason == pb.FINISH_REASON_STOP
    assert cut.end.usage.completion_tokens < full.end.usage.completion_tokens


async def test_vision_request_to_qwen3_5_counts_the_image_tokens(llm: Llm) -> None:
    data = png(96, 64)
    answer = await collect(
        llm.stub, chat_request(messages=[image_message("What is in this image?", data)], max_tokens=4)
    )
    assert answer.start.model == QWEN
    assert answer.end.usage.completion_tokens == 4
    # Independently: the template's one <|image_pad|> becomes prod(grid_thw) / merge^2 tokens.
    tokenizer = AutoTokenizer.from_pretrained(llm.qwen_weights)
    processor = Qwen2VLImageProcessorPil.from_pretrained(llm.qwen_weights)
    grid = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")[
        "image_grid_thw"
    ]
    image_tokens = int(grid.prod()) // processor.merge_size**2
    content: Any = [{"type": "text", "text": "What is in this image?"}, {"type": "image"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    base = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert image_tokens > 1
    assert answer.start.prompt_tokens == base - 1 + image_tokens


async def test_an_image_to_the_text_only_model_is_refused(llm: Llm) -> None:
    request = chat_request(model=SMOLLM2, messages=[image_message("What is this?", png())])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(llm.stub, request)
    assert_invalid_request(
        info.value,
        f"Model '{SMOLLM2}' does not support vision. Use '{QWEN}' for image inputs.",
    )


async def test_a_prompt_over_the_context_is_refused_before_generating(llm: Llm) -> None:
    steps_before = llm.engine(SMALL_CONTEXT).decoder.stats.prefills  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(llm.stub, chat_request("the sea " * 60, model=SMALL_CONTEXT))
    message = assert_invalid_request(info.value).message
    assert "prompt too long" in message and "the context is 64 tokens" in message
    assert llm.engine(SMALL_CONTEXT).decoder.stats.prefills == steps_before  # type: ignore[union-attr]


async def test_a_broken_image_is_an_invalid_request(llm: Llm) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(llm.stub, chat_request(messages=[image_message("What?", b"not an image")]))
    assert_invalid_request(info.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"messages": [text_message("robot", "hi")]}, "Invalid role 'robot' in message 1"),
        ({"messages": [pb.ChatMessage(role="user")]}, "Message 1 (user) has no content"),
        ({"temperature": 2.5}, "'temperature' must be between 0 and 2"),
        ({"top_p": 1.5}, "'top_p' must be between 0 and 1"),
        ({"max_tokens": 0}, "'max_tokens' must be between 1 and"),
        ({"model": SMALL_CONTEXT, "max_tokens": 65}, "'max_tokens' must be between 1 and 64"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "'stop' takes at most 4 sequences"),
        ({"model": "gpt-5"}, "Invalid model ID 'gpt-5'. Supported models: "),
    ],
)
async def test_bad_requests_are_invalid_argument(llm: Llm, fields: dict[str, object], message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(llm.stub, chat_request("Hello", **fields))  # type: ignore[arg-type]
    assert assert_invalid_request(info.value).message.startswith(message)


async def test_empty_messages_are_invalid(llm: Llm) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(llm.stub, pb.ChatRequest(model=QWEN))
    assert_invalid_request(info.value, "'messages' is required and must not be empty")
