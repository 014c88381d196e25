"""Continuous batching: concurrent requests share steps, answers do not depend on the company,
cancelled streams leave the batch; and the loop's text helpers."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kiln.llm.v1 import llm_service_pb2 as pb
from services.llm.batching import IncrementalDetokenizer, Sampling, StopMatcher, sample

from .conftest import MAX_BATCH, QWEN, SMOLLM2, SMOLLM2_TRANSFORMERS, Llm, chat_request, collect

PROMPTS = ("What is the capital of France?", "Write a poem about the sea.", "Hi", "Count to ten.")


async def wait_for(condition: object) -> None:
    """Waits (no deadline of its own: pytest-timeout bounds it) until ``condition()`` holds."""
    # The state lives on the decode loop's thread, which has no asyncio event to await.
    while not condition():  # type: ignore[operator]  # noqa: ASYNC110
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(("model", "max_tokens"), [(SMOLLM2, 24), (QWEN, 16)])
async def test_greedy_answers_are_the_same_batched_and_alone(llm: Llm, model: str, max_tokens: int) -> None:
    alone = [await collect(llm.stub, chat_request(p, model=model, max_tokens=max_tokens)) for p in PROMPTS]
    decoder = llm.engine(model).decoder
    assert decoder is not None
    with decoder.held():  # queue all four, then admit them together
        tasks = [
            asyncio.create_task(collect(llm.stub, chat_request(p, model=model, max_tokens=max_tokens)))
            for p in PROMPTS
        ]
        await wait_for(lambda: decoder.waiting == len(PROMPTS))
    batched = await asyncio.gather(*tasks)
    assert decoder.stats.largest_batch == len(PROMPTS) == MAX_BATCH
    for one, many in zip(alone, batched, strict=True):
        assert many.text == one.text
        assert many.end.usage == one.end.usage
        assert many.end.finish_reason == one.end.finish_reason
    # Different lengths finished independently (SmolLM2's "Hi" answer ends early).
    if model == SMOLLM2:
        assert len({a.end.usage.completion_tokens for a in batched}) > 1


async def test_cancelling_mid_stream_frees_the_slot(llm: Llm) -> None:
    decoder = llm.engine(QWEN).decoder
    assert decoder is not None
    calls = [llm.stub.Chat(chat_request(f"Story {i}", max_tokens=100_000)) for i in range(MAX_BATCH)]
    for call in calls:  # every slot busy: each has started and produced text
        assert (await call.read()).WhichOneof("event") == "start"
        assert (await call.read()).WhichOneof("event") == "delta"
    assert decoder.active == MAX_BATCH
    for call in calls:
        call.cancel()
    await wait_for(lambda: decoder.active == 0)
    answer = await collect(llm.stub, chat_request("Hello again", max_tokens=3))
    assert answer.end.finish_reason == pb.FINISH_REASON_LENGTH
    assert answer.end.usage.completion_tokens == 3


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    matcher = StopMatcher(["END!"])
    assert matcher.feed("Hello E") == ("Hello ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("X") == ("ENX", False)
    assert matcher.feed(" more EN") == (" more ", False)
    assert matcher.feed("D! tail") == ("", True)
    assert matcher.text.startswith("Hello ENX more END!")


@pytest.mark.parametrize("model", [SMOLLM2, SMOLLM2_TRANSFORMERS])
def test_incremental_detokenizer_never_splits_a_character(llm: Llm, model: str) -> None:
    """With transformers' tokenizer and with llama.cpp's (byte pieces joined, then decoded)."""
    tokenizer = llm.engine(model).tokenizer
    text = "Café 😀 naïve 東京"
    if model == SMOLLM2:
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 4
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_sampling_greedy_top_p_and_seed() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert sample(logits, Sampling(temperature=0.0), torch.Generator().manual_seed(0)) == 1
    # top_p 0 keeps only the most likely token
    assert sample(logits, Sampling(temperature=1.0, top_p=0.0), torch.Generator().manual_seed(0)) == 1
    draws = [
        sample(logits, Sampling(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s))
        for s in range(40)
    ]
    assert set(draws) == {1, 2}  # the nucleus is the two likely tokens
    again = [
        sample(logits, Sampling(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s))
        for s in range(40)
    ]
    assert draws == again
