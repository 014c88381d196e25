"""The request rules of speech and voice cloning (capabilities ``speech`` and ``voice-clone``).

In one place and free of torch, Piper and qwen-tts, so the edge can use them
too. Speech: the text is not blank and at most ``max_chars`` characters
(``settings.max_speech_chars``), the speed :data:`MIN_SPEED` to
:data:`MAX_SPEED` (OpenAI's range). Voice cloning: ``text`` and ``ref_text``
not blank and at most ``max_chars`` each, the language "Auto" or one the
loaded model speaks (:data:`DEFAULT_LANGUAGE` when empty), the reference
recording at least :data:`MIN_REFERENCE_SECONDS` long. The languages a model
speaks are an argument: only the loaded model knows them. Every failure is an
:class:`~services.common.errors.InvalidRequest`.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import InvalidRequest, quoted

#: Accepted speaking rates (OpenAI's range).
MIN_SPEED = 0.25
MAX_SPEED = 4.0
#: Default longest text (``settings.max_speech_chars`` overrides it per engine).
DEFAULT_MAX_CHARS = 4096
#: The contract's default language of voice cloning.
DEFAULT_LANGUAGE = "English"
#: Shortest usable reference recording (a few codec frames).
MIN_REFERENCE_SECONDS = 0.5


def check_speech(text: str, speed: float, *, max_chars: int) -> None:
    """Raises :class:`InvalidRequest` for empty or too long text or a speed out of range."""
    if not text.strip():
        raise InvalidRequest("'input' must not be empty")
    if len(text) > max_chars:
        raise InvalidRequest(f"'input' is {len(text)} characters long; the limit is {max_chars}")
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidRequest(f"'speed' must be between {MIN_SPEED} and {MAX_SPEED}, not {speed}")


def language_names(languages: Sequence[str]) -> list[str]:
    """The languages a clone request may ask for, capitalised as the contract writes them ("Auto" first)."""
    return [name.capitalize() for name in ("auto", *(n for n in languages if n != "auto"))]


def check_clone(text: str, ref_text: str, language: str, *, max_chars: int, languages: Sequence[str]) -> str:
    """Raises :class:`InvalidRequest` for an unusable clone request; returns the language to use.

    ``languages`` are the loaded model's, lower case."""
    for field, value in (("text", text), ("ref_text", ref_text)):
        if not value.strip():
            raise InvalidRequest(f"'{field}' must not be empty")
        if len(value) > max_chars:
            raise InvalidRequest(f"'{field}' is {len(value)} characters long; the limit is {max_chars}")
    language = language.strip() or DEFAULT_LANGUAGE
    if language.lower() != "auto" and language.lower() not in languages:
        raise InvalidRequest(
            f"Unsupported language '{quoted(language)}'. Supported languages: {', '.join(language_names(languages))}"
        )
    return language


def check_reference_duration(seconds: float) -> None:
    """A reference recording of at least :data:`MIN_REFERENCE_SECONDS`."""
    if seconds < MIN_REFERENCE_SECONDS:
        raise InvalidRequest(
            f"'ref_audio' is {seconds:.2f} seconds long; "
            f"at least {MIN_REFERENCE_SECONDS} seconds of speech are needed"
        )
