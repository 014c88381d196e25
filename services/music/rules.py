"""The request rules of music (capability ``music``), in one place and free of torch.

``prompt`` required, at most ``max_prompt_chars``; ``lyrics`` at most
:data:`MAX_LYRICS_CHARS` and empty when ``instrumental`` (ACE-Step then gets
its ``[Instrumental]`` lyric); ``bpm`` :data:`MIN_BPM` to :data:`MAX_BPM`;
``key_scale`` a note A-G with an optional ``#``/``b`` and ``major``/``minor``
("C Major", "F# minor"; handed to the model as "C major"); ``time_signature``
"beats/unit" with beats 1 to 16 and unit 1, 2, 4, 8, 16 or 32 ("4/4"; the
model gets the beats, as ACE-Step's "4"); ``vocal_language`` an ISO 639 code
or "unknown" ("en" by default); ``duration_seconds`` from
:data:`MIN_DURATION_SECONDS` to the model's ``max_duration_seconds``
(:func:`max_duration_seconds`), :data:`DEFAULT_DURATION_SECONDS` by default;
sources from 1 s to the same maximum; ``audio_cover_strength`` 0 to 1; a
repaint region with 0 <= start < end <= the song's length and at least one
latent frame long; ``num_inference_steps`` 1 to the model's ``max_steps``;
``seed`` 0 to :data:`~services.common.registry.MAX_SEED`.

The servicer checks the text conditions and the cheap numeric rules with
these before anything is decoded; the engine checks the rules that need the
model or the decoded source (its limits, sample rate and frame rate are
arguments here). Every failure is an :class:`~services.common.errors.InvalidRequest`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from services.common.errors import InvalidRequest, quoted
from services.common.registry import MAX_SEED, ModelSpec

#: Shortest song generated or accepted as a source, in seconds.
MIN_DURATION_SECONDS = 1.0
#: Length of a generated song when the request gives none (the contract's example).
DEFAULT_DURATION_SECONDS = 30.0
#: Longest song when the registry sets no ``max_duration_seconds`` (ACE-Step 1.5's ten minutes).
DEFAULT_MAX_DURATION_SECONDS = 600.0
#: Accepted tempo (ACE-Step's range).
MIN_BPM = 30
MAX_BPM = 300
#: Longest lyrics in characters (ACE-Step encodes at most 2048 lyric tokens).
MAX_LYRICS_CHARS = 4096
#: Longest prompt when the caller sets no limit (``settings.max_prompt_chars``' default).
DEFAULT_MAX_PROMPT_CHARS = 4000
#: Language of the lyrics when the request gives none.
DEFAULT_VOCAL_LANGUAGE = "en"
#: Lyric ACE-Step is given for instrumental music.
INSTRUMENTAL_LYRICS = "[Instrumental]"
#: Time signature units accepted (the lower number), and the most beats per bar.
TIME_SIGNATURE_UNITS = (1, 2, 4, 8, 16, 32)
MAX_BEATS_PER_BAR = 16

#: Longest key_scale / time_signature / vocal_language accepted: checked before any
#: pattern runs (the patterns backtrack on long runs of spaces).
MAX_CONDITION_CHARS = 32

_KEY_SCALE = re.compile(r"^\s*([A-Ga-g])\s*([#b\u266f\u266d]?)\s+(major|minor)\s*$", re.IGNORECASE)
_TIME_SIGNATURE = re.compile(r"^\s*(\d{1,3})\s*/\s*(\d{1,3})\s*$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$")


@dataclass(frozen=True)
class MusicConditions:
    """Checked and normalised text conditions of a request (what ACE-Step's prompt templates take)."""

    prompt: str
    lyrics: str = ""
    bpm: int | None = None
    #: "C major", "F# minor"; None: the model chooses.
    key_scale: str | None = None
    #: "4/4"; None: the model chooses.
    time_signature: str | None = None
    vocal_language: str = DEFAULT_VOCAL_LANGUAGE
    instrumental: bool = False

    @property
    def model_lyrics(self) -> str:
        return INSTRUMENTAL_LYRICS if self.instrumental else self.lyrics

    @property
    def model_time_signature(self) -> str | None:
        """ACE-Step's form: the beats per bar ("4" for 4/4)."""
        return self.time_signature.split("/")[0] if self.time_signature else None


def parse_key_scale(value: str) -> str | None:
    """ "C Major" / "f# minor" / "Bb MAJOR" -> "C major" / "F# minor" / "Bb major"; None when empty."""
    if not value.strip():
        return None
    found = _KEY_SCALE.match(value) if len(value) <= MAX_CONDITION_CHARS else None
    if found is None:
        raise InvalidRequest(
            f"Invalid key_scale '{quoted(value)}': use a note A-G with an optional '#' or 'b' and 'major' or "
            "'minor', e.g. 'C Major' or 'F# minor'"
        )
    note, accidental, mode = found.groups()
    accidental = {"\u266f": "#", "\u266d": "b"}.get(accidental, accidental)
    return f"{note.upper()}{accidental} {mode.lower()}"


def parse_time_signature(value: str) -> str | None:
    """ "4/4" -> "4/4"; None when empty."""
    if not value.strip():
        return None
    found = _TIME_SIGNATURE.match(value) if len(value) <= MAX_CONDITION_CHARS else None
    units = ", ".join(map(str, TIME_SIGNATURE_UNITS))
    message = (
        f"Invalid time_signature '{quoted(value)}': use beats/unit with 1 to {MAX_BEATS_PER_BAR} beats and a unit "
        f"of {units}, e.g. '4/4', '3/4' or '6/8'"
    )
    if found is None:
        raise InvalidRequest(message)
    beats, unit = int(found.group(1)), int(found.group(2))
    if not 1 <= beats <= MAX_BEATS_PER_BAR or unit not in TIME_SIGNATURE_UNITS:
        raise InvalidRequest(message)
    return f"{beats}/{unit}"


def music_conditions(
    *,
    prompt: str,
    lyrics: str = "",
    bpm: int | None = None,
    key_scale: str = "",
    time_signature: str = "",
    vocal_language: str = "",
    instrumental: bool = False,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> MusicConditions:
    """Checks a request's text conditions and normalises them (InvalidRequest on a bad one)."""
    if not prompt or not prompt.strip():
        raise InvalidRequest("'prompt' is required and must not be empty")
    if len(prompt) > max_prompt_chars:
        raise InvalidRequest(f"'prompt' is longer than {max_prompt_chars} characters")
    if len(lyrics) > MAX_LYRICS_CHARS:
        raise InvalidRequest(f"'lyrics' is longer than {MAX_LYRICS_CHARS} characters")
    if instrumental and lyrics.strip():
        raise InvalidRequest("'lyrics' must be empty when 'instrumental' is true")
    if bpm is not None and not MIN_BPM <= bpm <= MAX_BPM:
        raise InvalidRequest(f"'bpm' must be between {MIN_BPM} and {MAX_BPM}, not {bpm}")
    language = vocal_language.strip().lower() or DEFAULT_VOCAL_LANGUAGE
    if language != "unknown" and (len(language) > MAX_CONDITION_CHARS or not _LANGUAGE.match(language)):
        raise InvalidRequest(
            f"Invalid vocal_language '{quoted(vocal_language)}': use an ISO 639 language code such as 'en', 'zh' "
            "or 'ja', or 'unknown'"
        )
    return MusicConditions(
        prompt=prompt,
        lyrics=lyrics,
        bpm=bpm,
        key_scale=parse_key_scale(key_scale),
        time_signature=parse_time_signature(time_signature),
        vocal_language=language,
        instrumental=instrumental,
    )


def check_cover_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise InvalidRequest(f"'audio_cover_strength' must be between 0 and 1, not {strength}")


def check_region_bounds(start: float, end: float | None) -> None:
    """The parts of a repaint region that do not depend on the song: 0 <= start < end."""
    if not start >= 0.0 or math.isinf(start):
        raise InvalidRequest(f"'start' must be 0 or more seconds, not {start}")
    if end is not None and (not end > start or math.isinf(end)):
        raise InvalidRequest(f"'end' ({end} s) must be after 'start' ({start} s)")


def check_region_in_song(start: float, end: float | None, seconds: float, *, sample_rate: int) -> float:
    """A repaint region inside a song of ``seconds`` (half a sample of slack at the end); returns
    the region's end (the song's end when ``end`` is None)."""
    end = seconds if end is None else end
    if start >= seconds or end > seconds + 0.5 / sample_rate:
        raise InvalidRequest(f"The region {start:g}-{end:g} s is beyond the end of the song ({seconds:g} s)")
    return end


def check_region_length(start: float, end: float, *, frames_per_second: float) -> None:
    """A repaint region at least one latent frame of the model long."""
    if (end - start) * frames_per_second < 1.0:
        raise InvalidRequest(
            f"The region to repaint must be at least {1 / frames_per_second:g} seconds long "
            "(one frame of the model)"
        )


def max_duration_seconds(spec: ModelSpec) -> float:
    """A music model's longest song: its ``max_duration_seconds``, else :data:`DEFAULT_MAX_DURATION_SECONDS`."""
    return float(spec.limits.max_duration_seconds or DEFAULT_MAX_DURATION_SECONDS)


def check_duration(seconds: float, what: str, *, most: float) -> None:
    """A song (``what`` names it in the message) from :data:`MIN_DURATION_SECONDS` to ``most`` seconds."""
    if not MIN_DURATION_SECONDS <= seconds <= most:  # also refuses NaN
        raise InvalidRequest(
            f"{what} must be between {MIN_DURATION_SECONDS:g} and {most:g} seconds, not {seconds:g}"
        )


def check_steps(requested: int | None, *, default: int, most: int) -> int:
    """``num_inference_steps`` from 1 to the model's ``most``; returns the steps to run (``default``
    when none were asked for)."""
    steps = default if requested is None else requested
    if not 1 <= steps <= most:
        raise InvalidRequest(f"'num_inference_steps' must be between 1 and {most}")
    return steps


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"'seed' must be between 0 and {MAX_SEED}")


def check_covers(model: str, *, covers: bool) -> None:
    """A cover needs weights with an audio tokenizer."""
    if not covers:
        raise InvalidRequest(f"Model '{model}' cannot make covers: its weights have no audio tokenizer")
