"""The music engine outside gRPC: the real-weights path, request rules, splicing and PCM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.engine import EngineState
from services.common.errors import InvalidRequest
from services.common.registry import load_registry
from services.common.runner import Progress
from services.music.engines import (
    AceStepEngine,
    MusicRequest,
    MusicResult,
    TaskType,
    build_music_pool,
    conform_audio,
    splice_repaint,
    to_pcm16,
)
from services.music.rules import music_conditions, parse_key_scale, parse_time_signature
from services.music.tiny import TINY_VERSION

from .conftest import RATE, Music, song

LOCAL_MODEL = """
[[models]]
id = "ace-step-local"
capability = "music"
engine = "ace_step"
weights = "{weights}"

[models.limits]
max_width = 1
max_height = 1
max_duration_seconds = 30

[models.defaults]
steps = 8
guidance_scale = 1.0
"""


async def _generate(engine: AceStepEngine, request: MusicRequest) -> tuple[list[Progress], MusicResult]:
    progress: list[Progress] = []
    result: MusicResult | None = None
    async for event in engine.run(request):
        if isinstance(event, Progress):
            progress.append(event)
        else:
            result = event
    assert result is not None
    return progress, result


async def test_the_saved_tiny_model_loads_back_through_a_registry_weights_path(
    music: Music, tmp_path: Path
) -> None:
    saved = music.settings.resolved_model_cache_dir / f"ace-step-v1.5-tiny-v{TINY_VERSION}"
    assert (saved / "model_index.json").is_file()
    assert {"transformer", "condition_encoder", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in saved.iterdir()
    }
    assert {"audio_tokenizer", "audio_token_detokenizer"} <= {p.name for p in saved.iterdir()}
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no half-built model left

    registry_path = tmp_path / "registry.toml"
    registry_path.write_text(LOCAL_MODEL.format(weights=saved))
    empty_cache = tmp_path / "cache"
    pool = build_music_pool(load_registry(registry_path), cache_dir=empty_cache, default="ace-step-local")
    await pool.load()
    try:
        engine = pool.get("ace-step-local")
        assert isinstance(engine, AceStepEngine) and engine.weights_dir == saved
        assert (engine.sample_rate, engine.channels, engine.hop, engine.covers) == (RATE, 2, 1920, True)
        assert not empty_cache.exists()  # nothing was built: the directory was loaded as it is
        request = MusicRequest(
            task=TaskType.TEXT2MUSIC,
            conditions=music_conditions(prompt="a waltz", time_signature="3/4"),
            duration_seconds=1.0,
            seed=21,
            steps=2,
        )
        progress, local = await _generate(engine, request)
        assert [(p.step, p.total_steps) for p in progress] == [(1, 2), (2, 2)]
        served_engine = music.pool.get("ace-step-v1.5")
        assert isinstance(served_engine, AceStepEngine)
        _, served = await _generate(served_engine, request)
        assert local.pcm == served.pcm  # the same weights through the same loader: the same audio
        with pytest.raises(InvalidRequest, match="30"):  # this registry entry's own limit
            await _generate(
                engine, MusicRequest(TaskType.TEXT2MUSIC, request.conditions, duration_seconds=31)
            )
    finally:
        await pool.close()


async def test_a_weights_directory_without_a_pipeline_makes_the_model_unavailable(tmp_path: Path) -> None:
    empty = tmp_path / "weights"
    empty.mkdir()
    registry_path = tmp_path / "registry.toml"
    registry_path.write_text(LOCAL_MODEL.format(weights=empty))
    pool = build_music_pool(
        load_registry(registry_path), cache_dir=tmp_path / "cache", default="ace-step-local"
    )
    await pool.load()
    engine = pool.engines["ace-step-local"]
    assert engine.state is EngineState.UNAVAILABLE
    assert "does not hold a diffusers pipeline" in (engine.unavailable_reason or "")
    with pytest.raises(InvalidRequest, match="not available"):
        pool.get("ace-step-local")
    await pool.close()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("C Major", "C major"),
        ("f# minor", "F# minor"),
        ("Bb MAJOR", "Bb major"),
        ("E\u266d minor", "Eb minor"),
        ("", None),
    ],
)
def test_key_scales_are_normalised(given: str, expected: str | None) -> None:
    assert parse_key_scale(given) == expected


@pytest.mark.parametrize("bad", ["H Major", "C", "major", "C# dorian", "Cb# major", "C Major 7"])
def test_bad_key_scales_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="key_scale"):
        parse_key_scale(bad)


@pytest.mark.parametrize(
    ("given", "expected"), [("4/4", "4/4"), (" 6 / 8 ", "6/8"), ("16/16", "16/16"), ("", None)]
)
def test_time_signatures_are_normalised(given: str, expected: str | None) -> None:
    assert parse_time_signature(given) == expected


@pytest.mark.parametrize("bad", ["5/0", "0/4", "17/4", "4/3", "4", "4/4/4", "x/4"])
def test_bad_time_signatures_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="time_signature"):
        parse_time_signature(bad)


def test_instrumental_music_gets_ace_steps_instrumental_lyric_and_the_beats_of_the_bar() -> None:
    conditions = music_conditions(
        prompt="ambient", instrumental=True, time_signature="6/8", vocal_language="JA"
    )
    assert conditions.model_lyrics == "[Instrumental]"
    assert conditions.model_time_signature == "6"
    assert conditions.vocal_language == "ja"


def test_splicing_copies_the_outside_exactly_and_crossfades_inside() -> None:
    rng = np.random.default_rng(0)
    source = rng.uniform(-0.5, 0.5, (2, 1000)).astype(np.float32)
    generated = rng.uniform(-0.5, 0.5, (2, 1000)).astype(np.float32)
    out = splice_repaint(source, generated, 300, 700, 50)
    assert np.array_equal(out[:, :300], source[:, :300])
    assert np.array_equal(out[:, 700:], source[:, 700:])
    # Same loudness outside, so the gain is about 1: the middle is the generated audio.
    assert np.allclose(out[:, 350:650], generated[:, 350:650], atol=0.05)
    weights = np.arange(1, 51) / 51
    expected = source[:, 300:350] * (1 - weights) + np.clip(generated[:, 300:350], -1, 1) * weights
    assert np.allclose(out[:, 300:350], expected, atol=0.05)


def test_splicing_matches_the_loudness_of_the_source() -> None:
    source = np.full((2, 1000), 0.1, dtype=np.float32)
    generated = np.full((2, 1000), 0.4, dtype=np.float32)
    out = splice_repaint(source, generated, 400, 600, 0)
    assert np.allclose(out[:, 400:600], 0.1)


def test_pcm16_is_interleaved_and_exact_for_16_bit_input() -> None:
    samples = song(0.1)  # int16 (n, 2)
    audio = samples.T.astype(np.float32) / 32768
    assert to_pcm16(audio) == samples.tobytes()
    assert np.frombuffer(to_pcm16(np.array([[2.0, -2.0]], dtype=np.float32)), "<i2").tolist() == [
        32767,
        -32768,
    ]


def test_conform_audio_copies_mono_and_resamples() -> None:
    mono = (song(0.5, rate=24000, channels=1).astype(np.float32) / 32768)[:, :1]
    same = conform_audio(mono, 24000, sample_rate=24000, channels=2)
    assert (
        same.shape == (2, 12000) and np.array_equal(same[0], same[1]) and np.array_equal(same[0], mono[:, 0])
    )
    up = conform_audio(mono, 24000, sample_rate=RATE, channels=2)
    assert up.shape[0] == 2 and abs(up.shape[1] - 24000) <= 2
    stereo = song(0.5).astype(np.float32) / 32768
    kept = conform_audio(stereo, RATE, sample_rate=RATE, channels=2)
    assert np.array_equal(kept, stereo.T)


@pytest.mark.parametrize(
    ("parse", "field"),
    [(parse_key_scale, "key_scale"), (parse_time_signature, "time_signature")],
)
def test_a_long_value_is_refused_before_any_pattern_and_quoted_short(parse: Any, field: str) -> None:
    """'C' + 20,000 spaces + 'x' once froze the event loop (a backtracking pattern) and its
    echo overflowed the gRPC error metadata."""
    with pytest.raises(InvalidRequest, match=field) as info:
        parse("C" + " " * 20_000 + "x")
    assert len(info.value.message) < 300
