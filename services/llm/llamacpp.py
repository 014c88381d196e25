"""The llama.cpp chat engine: GGUF models on llama.cpp's batch API (``engine = "llamacpp"``).

Why: at 135 M parameters (SmolLM2) a token costs a few milliseconds of
arithmetic, and a transformers forward pass spends more than that in Python
and in building its cache. llama.cpp runs the whole step in C; through
``llama-cpp-python``'s bindings (the ``llamacpp`` extra) this engine drives it
the way llama.cpp's own server does:

* **One decode call per step for every active sequence.** Each request owns a
  *slot* (a llama.cpp sequence id in one unified KV cache); a step is one
  ``llama_decode`` of a batch holding the last sampled token of every
  generating sequence plus the prompt tokens of sequences still being
  prefilled (chunked at ``n_batch``), so requests join and leave between steps
  and a long prompt never stalls the others for more than a chunk.
* **Prefix reuse per slot.** A slot keeps its sequence's cache after the
  request ends; a new request goes to the free slot sharing the longest
  prefix with its prompt (a multi-turn conversation, a repeated system
  prompt) and only the rest is prefilled.
* **Room.** The KV cache holds ``context`` tokens in all (the registry's
  ``context``, or ``kv_tokens``): a request reserves its prompt plus its
  ``max_tokens`` when it joins and waits while that does not fit; idle slots'
  cached prefixes are dropped (least recently used first) to make room.
* **Sampling** is the shared :func:`~services.llm.batching.sample` on each
  row's logits, with the request's own seeded generator, and text streams
  through the same incremental detokenizer and stop matcher as every chat
  engine, so seeds, stops, finish reasons and usage mean what they mean for
  the transformers engines.

Weights: a GGUF file from a directory or a package (``weights``,
``options.package``, ``options.gguf_file``). ``options.gguf_type`` re-encodes
the weights once into the model cache with ``llama_model_quantize`` (``"f16"``,
``"q8_0"``, ...): the shipped SmolLM2 Q4_1 file answers "Paris" as the
transformers path does only once re-encoded (Q4_1 dot products quantise the
activations too). The chat template is the GGUF's own
(``tokenizer.chat_template``), rendered with llama-cpp-python's Jinja2
formatter; tokens are llama.cpp's.

GPU: all layers are offloaded (``n_gpu_layers = -1``); on a CPU build of
llama.cpp that is a no-op. Build llama-cpp-python for the GPU with
``CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python`` (or Vulkan,
Metal, ...): no code changes. Options ``threads`` / ``batch_threads`` set
llama.cpp's threads for decoding and for prompt chunks (default: every core).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.engine import EngineUnavailable
from services.common.errors import KilnError, ProcessingError
from services.common.model_cache import build_directory_once, derived_file_name
from services.llm.batching import BatchLoop, SequenceState, Started, sample

log = logging.getLogger(__name__)

#: Tokens one ``llama_decode`` call takes (prompt chunks plus one token per generating row).
N_BATCH = 512
#: Version of the re-encoding layout (part of the cache entry's name).
GGUF_TYPE_VERSION = 1
#: ``options.gguf_type`` -> llama.cpp's ``LLAMA_FTYPE_*`` name.
GGUF_TYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
}

_backend_lock = threading.Lock()
_backend_ready = False


def llama() -> Any:
    """The ``llama_cpp`` module, its backend initialised once per process, its log quiet."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineUnavailable(
            "the llamacpp engine needs llama-cpp-python: install Kiln with the 'llamacpp' extra"
        ) from exc
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_callback(llama_cpp), None)
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


_log_callbacks: list[Any] = []  # ctypes callbacks must outlive the library's use of them


def _log_callback(llama_cpp: Any) -> Any:
    def forward(level: int, text: bytes | None, _user: Any) -> None:
        if text and level in (3, 4) and text.strip(b". \n"):  # WARN and ERROR, no progress dots
            log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())

    callback = llama_cpp.llama_log_callback(forward)
    _log_callbacks.append(callback)
    return callback


def ensure_gguf_type(cache_dir: Path, model_id: str, path: Path, gguf_type: str) -> Path:
    """``path`` re-encoded as ``gguf_type`` in the model cache, made once (blocking; hold
    :data:`MODEL_LOAD_LOCK`)."""
    ftype_name = GGUF_TYPES.get(gguf_type)
    if ftype_name is None:
        raise EngineUnavailable(
            f"its option gguf_type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}"
        )
    lib = llama()
    name = derived_file_name(model_id, path, f"{gguf_type}-v{GGUF_TYPE_VERSION}")

    def build(staging: Path) -> None:
        params = lib.llama_model_quantize_default_params()
        params.ftype = getattr(lib, ftype_name)
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        out = staging / "model.gguf"
        if lib.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise EngineUnavailable(f"llama.cpp could not re-encode {path.name} as {gguf_type}")

    return build_directory_once(cache_dir / name, build, f"{model_id} as {gguf_type}") / "model.gguf"


class LlamaTokenizer:
    """llama.cpp's tokenizer of a loaded model, with the one method the detokenizer needs."""

    def __init__(self, lib: Any, vocab: Any) -> None:
        self.lib = lib
        self.vocab = vocab
        self.size = int(lib.llama_vocab_n_tokens(vocab))
        # Every token's text once (special tokens render as nothing: skip_special_tokens).
        self.pieces = [self.piece(token, special=False) for token in range(self.size)]

    def piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens parsed, nothing added (a chat template adds them)."""
        data = text.encode()
        room = len(data) + 16
        for _ in range(2):
            tokens = (self.lib.llama_token * room)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, room, False, True)
            if n >= 0:
                return list(tokens[:n])
            room = -n
        raise ProcessingError("The prompt could not be tokenized.")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        del skip_special_tokens  # special tokens always render as nothing here
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def end_of_generation_ids(self) -> frozenset[int]:
        return frozenset(t for t in range(self.size) if self.lib.llama_vocab_is_eog(self.vocab, t))


class LlamaModel:
    """A loaded GGUF model and one context (unified KV cache of ``n_ctx`` tokens, ``n_seq`` sequences)."""

    def __init__(self, path: Path, *, n_ctx: int, n_seq: int, threads: int, batch_threads: int) -> None:
        lib = self.lib = llama()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = -1
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise EngineUnavailable(f"llama.cpp could not load {path.name}")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = N_BATCH
        ctx_params.n_seq_max = n_seq
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = batch_threads
        ctx_params.kv_unified = True
        ctx_params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise EngineUnavailable("llama.cpp could not create a context for it")
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))
        self.memory = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.tokenizer = LlamaTokenizer(lib, self.vocab)
        self.batch = lib.llama_batch_init(N_BATCH, 0, 1)

    def chat_template(self) -> str | None:
        raw = self.lib.llama_model_chat_template(self.model, None)
        return raw.decode() if raw else None

    def logits(self, index: int) -> torch.Tensor:
        """The ``[V]`` logits of batch position ``index`` of the last decode (valid until the next one)."""
        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.tokenizer.size,)))

    def forget(self, seq_id: int, start: int = 0) -> None:
        """Drops ``seq_id``'s cached positions from ``start`` on."""
        self.lib.llama_memory_seq_rm(self.memory, seq_id, start, -1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence id: the tokens its cache holds, the request using it, if any."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    seq: SequenceState | None = None
    #: Prompt tokens still to decode, and how many tokens the request reserved.
    feed: list[int] = field(default_factory=list)
    reserved: int = 0
    used_at: float = 0.0


class LlamaCppLoop(BatchLoop):
    """The batching loop of a :class:`LlamaModel` (see the module docs)."""

    def __init__(self, model: LlamaModel, *, name: str, max_batch: int, policy: Any = None) -> None:
        self.model = model
        self.slots = [Slot(i) for i in range(max_batch)]
        self._deferred: list[SequenceState] = []
        #: Prompt tokens found in a slot's cache instead of being decoded again.
        self.reused_tokens = 0
        super().__init__(name=name, max_batch=max_batch, policy=policy)

    @property
    def waiting(self) -> int:
        return super().waiting + len(self._deferred)

    def _room(self) -> int:
        return 0 if self._deferred else super()._room()

    def _closed_loop(self) -> None:
        for seq in self._deferred:
            seq.fail(ProcessingError("The model is shutting down."))
        self._deferred.clear()
        self.model.close()

    # --- joining ---

    def _admit(self, seq: SequenceState) -> None:
        if seq.cancelled:
            seq.done = True
            return
        if not self._place(seq):
            self._deferred.append(seq)

    def _place(self, seq: SequenceState) -> bool:
        """Gives ``seq`` a free slot if its reservation fits the cache; False to wait."""
        prompt: list[int] = seq.prompt.input_ids[0].tolist()
        need = len(prompt) + seq.max_new_tokens
        free = [s for s in self.slots if s.seq is None]
        if not free:
            return False

        def shared(slot: Slot) -> int:
            n = 0
            for a, b in zip(slot.cached, prompt[:-1], strict=False):  # the last token is always decoded
                if a != b:
                    break
                n += 1
            return n

        # the free slot sharing the longest prefix; of equals, the least recently used
        keep, _, slot = max(((shared(s), -s.used_at, s) for s in free), key=lambda c: c[:2])
        in_use = sum(s.reserved for s in self.slots if s.seq is not None)
        idle = sorted((s for s in free if s is not slot and s.cached), key=lambda s: s.used_at)
        idle_cached = sum(len(s.cached) for s in idle)
        if in_use + need + idle_cached > self.model.n_ctx:
            if in_use + need > self.model.n_ctx:
                return False  # waits for a running request to end
            for other in idle:  # drop idle prefixes, least recently used first
                if in_use + need + idle_cached <= self.model.n_ctx:
                    break
                idle_cached -= len(other.cached)
                self.model.forget(other.seq_id)
                other.cached = []
        self.model.forget(slot.seq_id, keep)
        slot.cached = prompt[:keep]
        self.reused_tokens += keep
        slot.feed = prompt[keep:]
        slot.seq, slot.reserved, slot.used_at = seq, need, time.monotonic()
        seq.position = keep
        self._active.append(seq)
        return True

    # --- one step ---

    def _slot_of(self, seq: SequenceState) -> Slot:
        return next(s for s in self.slots if s.seq is seq)

    def _step(self) -> None:
        batch = self.model.batch
        rows: list[tuple[SequenceState, int]] = []  # (sequence, batch index of its logits)
        n = 0

        def add(slot: Slot, seq: SequenceState, tokens: list[int], logits: bool) -> None:
            """Appends ``tokens`` at ``seq``'s next positions; logits for the last one if asked."""
            nonlocal n
            for token in tokens:
                batch.token[n] = token
                batch.pos[n] = seq.position
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = False
                seq.position += 1
                n += 1
            slot.cached.extend(tokens)
            if logits:
                batch.logits[n - 1] = True
                rows.append((seq, n - 1))

        active = [(self._slot_of(seq), seq) for seq in self._active if not seq.cancelled]
        for slot, seq in active:  # generating rows first: one token each
            if not slot.feed:
                add(slot, seq, [seq.last_token], True)
        for slot, seq in active:  # then prompt chunks, in arrival order, while the batch has room
            if slot.feed and n < N_BATCH:
                chunk, slot.feed = slot.feed[: N_BATCH - n], slot.feed[N_BATCH - n :]
                add(slot, seq, chunk, not slot.feed)
        if n == 0:
            return
        batch.n_tokens = n
        status = self.model.lib.llama_decode(self.model.ctx, batch)
        if status != 0:
            log.error("llm %s: llama_decode returned %d", self.name, status)
            for slot, seq in active:
                seq.fail(ProcessingError("Generation failed."))
                self.model.forget(slot.seq_id)
                slot.cached, slot.feed = [], []
            return
        self.stats.steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        self.stats.batch_sizes[len(rows)] += 1
        for seq, index in rows:
            if seq.cancelled:
                continue
            try:
                if seq.generated == 0:
                    self.stats.prefills += 1
                    seq.emit(Started(seq.prompt.tokens))
                seq.accept(sample(self.model.logits(index), seq.sampling, seq.generator))
            except Exception as exc:
                log.exception("llm %s: sampling failed", self.name)
                seq.fail(exc if isinstance(exc, KilnError) else ProcessingError("Generation failed."))

    # --- leaving ---

    def _retire(self) -> None:
        if not any(s.done or s.cancelled for s in self._active):
            return  # no room freed: a deferred request still waits
        for slot in self.slots:
            seq = slot.seq
            if seq is not None and (seq.done or seq.cancelled):
                seq.done = True
                if slot.feed:  # a prompt left half-decoded is no prefix worth keeping
                    self.model.forget(slot.seq_id)
                    slot.cached = []
                slot.seq, slot.feed, slot.reserved, slot.used_at = None, [], 0, time.monotonic()
        self._active = [s for s in self._active if not s.done]
        self._retry_deferred()

    def _retry_deferred(self) -> None:
        while self._deferred:
            seq = self._deferred[0]
            if seq.cancelled:
                seq.done = True
                self._deferred.pop(0)
                continue
            if not self._place(seq):
                return
            self._deferred.pop(0)
