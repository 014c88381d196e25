"""Continuous batching for chat engines: one decode loop per engine, on its own thread.

Why not transformers' own continuous batching (``generate_batch`` /
``init_continuous_batching``)? It runs SmolLM2 here, but it cannot serve this
service: its requests are token ids only (no ``pixel_values``, so no vision
for Qwen3.5), its paged cache has no room for Qwen3.5's linear-attention
(gated delta net) states, and sampling draws from one generator for the whole
batch, so a request's ``seed`` could not make its answer reproducible. So the
service batches by itself, with transformers' own models and caches:

* **Admission.** A request (already tokenized, its images already turned
  into pixel patches, on a thread pool) waits in a bounded, fair queue
  (:class:`~services.common.admission.FairQueue`: a full queue refuses it with
  a 429, accounts are admitted fairly, premium in its own lane). Between two decode
  steps the loop admits waiting requests, up to ``max_batch`` active ones:
  each is **prefilled alone** (batch of one, its own ``DynamicCache``), its
  first token sampled and streamed, and its cache is then merged into the
  batch's cache.
* **The batch cache** is one transformers ``DynamicCache`` for all active
  rows. Full-attention layers hold ``[B, heads, T, dim]`` keys and values,
  left-padded to the longest row (the batch's 2-D attention mask marks the
  padding); linear-attention layers hold fixed-size per-row convolution and
  recurrent states, which simply stack. Rows keep their own positions (and,
  for Qwen3.5, their multimodal RoPE offset), passed as ``position_ids``, so
  padding never shifts a position.
* **A step** runs one forward pass of the last token of every active row,
  then samples each row with its own settings and ``torch.Generator``
  (temperature 0 is greedy), and streams each row's new text, decoded
  incrementally so a multi-byte character is never split, with stop
  sequences held back until they are ruled out and cut when they are met.
* **Retirement.** A row leaves the batch at once when it ends (the model's
  end-of-turn token, a stop sequence, ``max_tokens`` or the context) or its
  consumer is gone (cancelled RPC): its row is dropped from the cache
  (``reorder_cache`` with the remaining rows) and the padding columns no row
  needs any more are cut. Streams of different lengths finish independently.

Greedy answers do not depend on the company a request keeps: the prompt is
processed alone, and in a batched step a padded key has weight exactly zero;
``tests/services/llm`` checks that batched and lone answers are identical.

Errors follow Triton's rule: a failed prefill fails only its request; a failed
batched step fails the requests of that batch (with ``ProcessingError``) and
the loop carries on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from services.common.admission import Caller, FairQueue, QueuePolicy, caller_var
from services.common.errors import KilnError, ProcessingError

log = logging.getLogger(__name__)

STOP = "stop"
LENGTH = "length"


@dataclass(frozen=True)
class Sampling:
    """How one request samples (checked by the servicer)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """First event of a stream: the prompt was accepted (its token count)."""

    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    """New answer text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Last event: why generation ended and the token counts."""

    finish_reason: str  # STOP | LENGTH
    prompt_tokens: int
    completion_tokens: int


Event = Started | Delta | Finished | BaseException


@dataclass
class Prompt:
    """A tokenized prompt: ``input_ids`` ``[1, L]`` plus model inputs (pixels), ready for prefill."""

    input_ids: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class Prefilled:
    """What a prefill leaves: the last position's logits, the cache, and the row's position state."""

    logits: torch.Tensor  # [V]
    cache: Any
    next_position: int
    rope_delta: int = 0


class ModelAdapter(ABC):
    """The model-specific half of the loop: prefill one prompt, decode one step of a batch."""

    @abstractmethod
    def prefill(self, prompt: Prompt) -> Prefilled: ...

    @abstractmethod
    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rope_deltas: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Logits ``[B, V]`` of one step: ``tokens`` ``[B, 1]``, ``positions`` ``[B]`` (text positions)."""


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

    As TGI does: decode a short window before the new tokens and with them, and
    hand out the difference only when it does not end in a replacement
    character (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Cuts the answer at the first stop sequence; holds back text that may still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was met)."""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, False
        longest = max(len(s) for s in self.stops)
        start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.sent : cut]
            self.sent = len(self.text)
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:n]):
                    hold = n
                    break
        safe = len(self.text) - hold
        out = self.text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from ``[V]`` logits: greedy at temperature 0, else temperature and nucleus (top_p)."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits).item())
    scaled = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        outside = before >= sampling.top_p
        outside[0] = False  # the most likely token always stays (top_p 0 is greedy)
        ordered = ordered.masked_fill(outside, float("-inf"))
        choice = torch.multinomial(torch.softmax(ordered, dim=-1), 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).item())


class SequenceState:
    """One request inside the loop. ``emit`` is called on the loop thread and must not block."""

    def __init__(
        self,
        prompt: Prompt,
        *,
        sampling: Sampling,
        max_new_tokens: int,
        eos_ids: frozenset[int],
        tokenizer: Any,
        emit: Callable[[Event], None],
        seed: int,
    ) -> None:
        self.prompt = prompt
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.emit = emit
        self.generator = torch.Generator().manual_seed(seed)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(sampling.stop)
        self.generated = 0
        self.last_token = 0
        self.position = 0
        self.rope_delta = 0
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """The consumer is gone: leave the batch at the next step (any thread)."""
        self.cancelled = True

    def accept(self, token: int) -> bool:
        """Takes one sampled token, streams its text; True when the sequence is finished."""
        self.generated += 1
        self.last_token = token
        if token in self.eos_ids:
            self._finish(STOP, self.stops.feed(self.detok.flush())[0] + self.stops.flush())
            return True
        text, stopped = self.stops.feed(self.detok.add(token))
        if stopped:
            self._finish(STOP, text)
            return True
        if self.generated >= self.max_new_tokens:
            tail, stopped = self.stops.feed(self.detok.flush())
            text += tail
            self._finish(STOP if stopped else LENGTH, text if stopped else text + self.stops.flush())
            return True
        if text:
            self.emit(Delta(text))
        return False

    def _finish(self, reason: str, text: str) -> None:
        if text:
            self.emit(Delta(text))
        self.emit(Finished(reason, self.prompt.tokens, self.generated))
        self.done = True

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self.emit(exc)


# --- batch cache surgery (transformers DynamicCache with full- and linear-attention layers) ---


def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _is_linear(layer: Any) -> bool:
    return hasattr(layer, "conv_states") and hasattr(layer, "recurrent_states")


def _has_kv(layer: Any) -> bool:
    keys = getattr(layer, "keys", None)
    return isinstance(keys, torch.Tensor) and keys.numel() > 0


def check_cache(cache: Any) -> None:
    """Raises when the cache has layers this loop cannot pad or stack (sliding windows, static caches)."""
    for layer in _layers(cache):
        if getattr(layer, "is_sliding", False):
            raise ValueError(f"cache layer {type(layer).__name__} (sliding window) cannot be batched here")
        if not (_is_linear(layer) or hasattr(layer, "keys")):
            raise ValueError(f"cache layer {type(layer).__name__} cannot be batched here")


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n else t


def merge_cache(into: Any, new: Any, into_len: int, new_len: int) -> None:
    """Appends ``new``'s rows to ``into``, both left-padded to the longer length (in place on ``into``)."""
    length = max(into_len, new_len)
    for a, b in zip(_layers(into), _layers(new), strict=True):
        if _is_linear(a):
            for i in range(a.number_of_states):
                for name in ("conv_states", "recurrent_states"):
                    sa, sb = getattr(a, name)[i], getattr(b, name)[i]
                    if sa is not None and sb is not None:
                        getattr(a, name)[i] = torch.cat([sa, sb], dim=0)
        if _has_kv(a) and _has_kv(b):
            a.keys = torch.cat([_left_pad(a.keys, length - into_len), _left_pad(b.keys, length - new_len)])
            a.values = torch.cat(
                [_left_pad(a.values, length - into_len), _left_pad(b.values, length - new_len)]
            )


def trim_cache(cache: Any, columns: int) -> None:
    """Drops the first ``columns`` key/value positions (padding no row needs any more)."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        if _has_kv(layer):
            layer.keys = layer.keys[:, :, columns:, :].contiguous()
            layer.values = layer.values[:, :, columns:, :].contiguous()


@dataclass
class LoopStats:
    """Counters for health, metrics and tests."""

    steps: int = 0
    prefills: int = 0
    largest_batch: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)


class BatchLoop(ABC):
    """The admission half of a batching loop, shared by every chat engine's loop: a fair queue,
    a thread that admits waiting requests between steps up to ``max_batch`` active ones, then
    runs one step for all of them. Subclasses say how a request joins (:meth:`_admit`), how
    one step runs (:meth:`_step`) and how finished rows leave (:meth:`_retire`); they set
    their own state before calling this constructor, which starts the thread."""

    def __init__(self, *, name: str, max_batch: int = 8, policy: QueuePolicy | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.name = name
        self.max_batch = max_batch
        self.stats = LoopStats()
        self._pending: FairQueue[SequenceState] = FairQueue(name, policy)
        self._cond = threading.Condition()
        self._closed = False
        self._holds = 0
        self._active: list[SequenceState] = []
        self._thread = threading.Thread(target=self._run, name=f"llm-{name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, seq: SequenceState, caller: Caller | None = None) -> None:
        """Queues ``seq`` for ``caller`` (default: the current request's); raises
        :class:`~services.common.errors.RateLimited` when the queue is full."""
        caller = caller or caller_var.get()
        with self._cond:
            if self._closed:
                raise ProcessingError("The model is shutting down.")
            try:
                self._pending.check(caller)
            except KilnError:  # requests whose consumer left still hold places: free them first
                self._pending.discard(lambda waiting: waiting.cancelled)
            self._pending.push(seq, caller)
            self._cond.notify()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """While held, no waiting request is admitted (tests use it to form a batch on purpose)."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # --- the loop thread ---

    def _room(self) -> int:
        """How many more requests may join now."""
        return self.max_batch - len(self._active)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._closed and not self._active and (self._holds or not self._pending):
                    self._cond.wait()
                if self._closed:
                    break
                admit: list[SequenceState] = []
                if not self._holds:
                    room = self._room()
                    while len(admit) < room:
                        queued = self._pending.pop()
                        if queued is None:
                            break
                        admit.append(queued)
            with torch.inference_mode():
                for seq in admit:
                    self._admit(seq)
                self._retire()
                if self._active:
                    self._step()
                    self._retire()
        shutting_down = ProcessingError("The model is shutting down.")
        for seq in [*self._active, *self._pending.drain()]:
            seq.fail(shutting_down)
        self._active.clear()
        self._closed_loop()

    @abstractmethod
    def _closed_loop(self) -> None:
        """Frees what the loop holds once it has stopped (on the loop thread)."""

    @abstractmethod
    def _admit(self, seq: SequenceState) -> None:
        """Lets ``seq`` join (it appends itself to ``_active``, or fails/finishes)."""

    @abstractmethod
    def _step(self) -> None:
        """One step for every active row."""

    @abstractmethod
    def _retire(self) -> None:
        """Drops the rows that are done or cancelled."""


class DecodeLoop(BatchLoop):
    """The transformers batching loop of one engine (see the module docs). Thread-safe ``submit``."""

    def __init__(
        self, adapter: ModelAdapter, *, name: str, max_batch: int = 8, policy: QueuePolicy | None = None
    ) -> None:
        self.adapter = adapter
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        super().__init__(name=name, max_batch=max_batch, policy=policy)

    def _admit(self, seq: SequenceState) -> None:
        if seq.cancelled:
            seq.done = True
            return
        try:
            pre = self.adapter.prefill(seq.prompt)
            self.stats.prefills += 1
            check_cache(pre.cache)
            seq.position, seq.rope_delta = pre.next_position, pre.rope_delta
            seq.emit(Started(seq.prompt.tokens))
            if seq.accept(sample(pre.logits, seq.sampling, seq.generator)):
                return
        except Exception as exc:
            log.exception("llm %s: prefill failed", self.name)
            seq.fail(exc if isinstance(exc, KilnError) else ProcessingError("Generation failed."))
            return
        length = pre.cache.get_seq_length()
        row_mask = torch.ones(1, length, dtype=torch.long)
        if self._cache is None or self._mask is None:
            self._cache, self._mask = pre.cache, row_mask
        else:
            current = int(self._mask.shape[1])
            merge_cache(self._cache, pre.cache, current, length)
            width = max(current, length)
            self._mask = torch.cat(
                [F.pad(self._mask, (width - current, 0)), F.pad(row_mask, (width - length, 0))]
            )
        self._active.append(seq)

    def _step(self) -> None:
        assert self._mask is not None
        rows = self._active
        tokens = torch.tensor([[s.last_token] for s in rows], dtype=torch.long)
        positions = torch.tensor([s.position for s in rows], dtype=torch.long)
        deltas = torch.tensor([s.rope_delta for s in rows], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        try:
            logits = self.adapter.decode(tokens, positions, deltas, mask, self._cache)
        except Exception:
            log.exception("llm %s: batched step failed", self.name)
            for seq in rows:
                seq.fail(ProcessingError("Generation failed."))
            self._reset()
            return
        self._mask = mask
        self.stats.steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        self.stats.batch_sizes[len(rows)] += 1
        for i, seq in enumerate(rows):
            seq.position += 1
            if seq.cancelled:
                continue
            try:
                seq.accept(sample(logits[i], seq.sampling, seq.generator))
            except Exception:
                log.exception("llm %s: sampling failed", self.name)
                seq.fail(ProcessingError("Generation failed."))

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not (s.done or s.cancelled)]
        if len(keep) == len(self._active):
            return
        for seq in self._active:
            if seq.cancelled:
                seq.done = True
        if not keep:
            self._reset()
            return
        assert self._mask is not None
        self._active = [self._active[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long)
        self._cache.reorder_cache(index)
        self._mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row are dead weight: cut them.
        real = self._mask.sum(dim=0) > 0
        first = int(torch.nonzero(real)[0].item()) if bool(real.any()) else 0
        if first:
            trim_cache(self._cache, first)
            self._mask = self._mask[:, first:]

    def _closed_loop(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._active = []
        self._cache = None
        self._mask = None
