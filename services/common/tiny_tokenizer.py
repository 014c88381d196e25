"""An offline Qwen-style tokenizer for tiny random-weight models.

Every tiny model Kiln builds (Z-Image, LongCat, FLUX.2-klein, Wan, ACE-Step,
SAM3, Qwen VLMs...) needs a tokenizer, and the real ones live on a model hub
this project must not depend on. :func:`build_tiny_tokenizer` trains a
byte-level BPE (the same family as Qwen's) on a small built-in corpus with
``tokenizers``' ``BpeTrainer``, adds Qwen's special tokens and a minimal
ChatML chat template, and wraps it in ``transformers.Qwen2TokenizerFast``.

The result is deterministic: the same corpus and vocabulary size give the same
vocabulary and merges in every run, so a tiny model's ``vocab_size`` (size it
to ``len(tokenizer)``) and its saved tokenizer always agree. Save it with
``save_pretrained`` next to the model; load it back with
``AutoTokenizer.from_pretrained`` like any real tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: Qwen2/2.5/3 special tokens, in Qwen's order (``<|endoftext|>`` first).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Qwen3's reasoning markers: ordinary (non-special) added tokens, as in Qwen3.
QWEN_THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")

#: A ChatML template in Qwen's shape: system/user/assistant turns, an optional
#: generation prompt, and Qwen3's ``enable_thinking`` switch (an empty think
#: block when thinking is disabled). Images and videos inside structured
#: content become Qwen's vision placeholders.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

#: The built-in training text: plain English of the kind prompts contain, plus
#: digits and punctuation, so common words become single tokens.
_CORPUS: tuple[str, ...] = (
    "a photo of a cat sitting on a red chair in the sun",
    "a painting of a mountain lake at sunset, oil on canvas, highly detailed",
    "portrait of a young woman with short hair, studio lighting, 85mm lens",
    "a small dog running on the beach, waves, bright blue sky, clouds",
    "an old wooden house in a forest covered with snow, winter evening",
    "a bowl of fruit on a kitchen table: apples, oranges, bananas and grapes",
    "city street at night with neon signs, rain, reflections, cinematic",
    "blurry, distorted, low quality, bad anatomy, text, watermark, signature",
    "make the sky green and add a rainbow over the river",
    "remove the background and keep the person in the front",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello! How are you today? I am fine, thank you. What is the capital of France?",
    "The capital of France is Paris. Write a short poem about the sea.",
    "You are a helpful assistant. Describe the image in one sentence.",
    "[verse] the night is young and the lights are bright [chorus] sing with me",
    "piano, guitar, drums, bass, soft pop song with female vocals, 120 bpm",
    "a cinematic shot of a car driving along a coastal road, drone view",
    "a robot reading a book in a library, warm light, watercolor style",
)


def build_tiny_tokenizer(*, vocab_size: int = 512, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with Qwen's special tokens and chat template.

    ``vocab_size`` is the target size of the trained vocabulary (the corpus is
    small, so the real size may be lower); size a model's embedding table to
    ``len(tokenizer)``, which also counts the added special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)

    wrapped = Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    wrapped.add_special_tokens(
        {"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]}
    )
    wrapped.add_tokens(list(QWEN_THINK_TOKENS))
    wrapped.chat_template = QWEN_CHAT_TEMPLATE
    return wrapped
