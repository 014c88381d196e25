"""``kiln image | edit | upscale | segment | remove-bg | speak | clone | music | video | chat``.

Each command is one row of :data:`COMMANDS`: its route, the request fields its
arguments fill (:class:`Arg`), how the request is sent (JSON, or a multipart
form for the upload routes) and what its answer is (:class:`Command`.``answer``).
One function (:func:`run`) runs them all; only ``kiln chat``, a conversation,
has its own.

Output: the file goes to ``-o`` (``-`` is stdout; a default name otherwise), a
one-line summary to stderr; ``--json`` prints the JSON answer to stdout and
nothing else (for a file answer, a description shaped as a task's file output).
Long jobs show a progress bar on stderr when it is a terminal. Errors are one
line on stderr, ``kiln: <the contract's message> (<type>, HTTP <status>)``,
and exit status 1 (2 for a bad command line, from argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import functools
import json
import mimetypes
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from kiln_cli.client.api import Api, ApiError, Bar, Reply, connection
from services.common.settings import Settings

#: Answered by the route: ``images`` (JSON ``data[]`` of ``b64_json``/``url``), ``file`` (the
#: body is the file) or ``media`` (JSON, or a ``result`` event, with the stored file's ``url``).
Answer = Literal["images", "file", "media"]

IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
AUDIO_FORMATS = {f".{kind}": kind for kind in ("wav", "mp3", "flac", "opus", "aac")}
SPEECH_FORMATS = {**AUDIO_FORMATS, ".pcm": "pcm"}
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".m4v")


@dataclass(frozen=True)
class Arg:
    """One command-line argument and the request field it fills (``None``: left out)."""

    flags: tuple[str, ...]
    field: str
    help: str
    #: The argument names a local file, sent as the field (base64 in JSON; a file part in a form).
    file: bool = False
    #: The field is a list (JSON); the one file goes in it.
    many: bool = False
    options: Mapping[str, Any] = dataclasses.field(
        default_factory=dict
    )  # argparse's: type, choices, default, ...

    @property
    def dest(self) -> str:
        """Where argparse keeps it: apart from the command's own options (segment's ``output``
        field is not ``-o``)."""
        return f"field.{self.field}"


def arg(name: str, help: str, field: str | None = None, **options: Any) -> Arg:
    """A positional argument."""
    return Arg((name,), field or name, help, options=options)


def opt(flag: str, field: str, help: str, **options: Any) -> Arg:
    return Arg((flag,), field, help, options=options)


def infile(name: str, field: str, help: str, *, many: bool = False, **options: Any) -> Arg:
    """A local file (positional, or an option when ``name`` starts with ``-``)."""
    return Arg((name,), field, help, file=True, many=many, options=options)


MODEL = opt("--model", "model", "a model id or alias (GET /v1/models); the route's default when absent")
SEED = opt("--seed", "seed", "random seed, for a repeatable result", type=int)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    path: str
    args: tuple[Arg, ...]
    answer: Answer
    #: Written here when -o is not given.
    out: str
    #: A multipart form (the upload routes) rather than a JSON body.
    form: bool = False
    #: The route streams ``progress`` events with ``Accept: text/event-stream``.
    progress: bool = False
    #: The output format field, set from -o's suffix (``fox.jpg``: ``jpeg``), and the suffixes it knows.
    format_field: str | None = None
    formats: Mapping[str, str] = dataclasses.field(default_factory=dict)
    query: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: The route and default name when the input file is a video (background removal).
    video: tuple[str, str] | None = None


COMMANDS: tuple[Command, ...] = (
    Command(
        "image",
        "generate images from a prompt",
        "/v1/images/generations",
        (
            arg("prompt", "what to draw"),
            opt("--size", "image_size", "256x256, 512x512, 1024x1024 (default), 1024x1792 or 1792x1024"),
            MODEL,
            SEED,
            opt("--steps", "num_inference_steps", "inference steps", type=int),
            opt("-n", "n", "how many images (1-4); fox.png, fox-2.png, ...", type=int),
            opt("--negative", "negative_prompt", "what to avoid"),
            opt("--style", "style_preset", "a style preset (GET /v1/images/styles)"),
        ),
        "images",
        "image.png",
        format_field="format",
        formats=IMAGE_FORMATS,
    ),
    Command(
        "edit",
        "edit an image guided by a prompt",
        "/v1/images/edits",
        (
            infile("image", "input_images", "the image to edit (PNG, JPEG or WebP)", many=True),
            arg("prompt", "the edit"),
            infile("--mask", "mask", "a mask: transparent pixels are repainted"),
            opt("--size", "size", "the output size (default: the input's)"),
            MODEL,
            SEED,
            opt("--steps", "num_steps", "inference steps", type=int),
        ),
        "images",
        "edited.png",
        format_field="format",
        formats=IMAGE_FORMATS,
    ),
    Command(
        "upscale",
        "upscale an image",
        "/v1/images/upscale",
        (
            infile("image", "image", "the image to upscale"),
            opt(
                "--method",
                "method",
                "realesrgan_2x, realesrgan_4x (default), realesrgan_4x_anime, swin2sr or lanczos",
                default="realesrgan_4x",
            ),
            opt("--scale", "scale", "lanczos 2-8, swin2sr 2-4; fixed by the other methods", type=int),
        ),
        "images",
        "upscaled.png",
        format_field="format",
        formats=IMAGE_FORMATS,
    ),
    Command(
        "segment",
        "cut out what a prompt or points name (SAM3)",
        "/v1/images/segmentations",
        (
            infile("image", "file", "the image"),
            opt("--prompt", "prompt", "what to segment"),
            opt("--points", "point_coords", "JSON [[x, y], ...] in the image's pixels"),
            opt("--labels", "point_labels", "JSON [1, 0, ...]: 1 foreground, 0 background"),
            opt(
                "--mask", "output", "a grey mask rather than the cut-out", action="store_const", const="mask"
            ),
            MODEL,
        ),
        "file",
        "segmented_image.png",
        form=True,
    ),
    Command(
        "remove-bg",
        "remove the background of an image or a video (kept: what the prompt names)",
        "/v1/images/remove-background",
        (
            infile("file", "file", "the image (PNG, JPEG, WebP) or video (MP4, MOV, WebM)"),
            opt("--prompt", "prompt", "the object to keep", required=True),
            MODEL,
        ),
        "file",
        "background_removed.png",
        form=True,
        video=("/v1/videos/remove-background", "background_removed_video.webm"),
    ),
    Command(
        "speak",
        "speak a text (Piper)",
        "/v1/audio/speech",
        (
            arg("text", "what to say", field="input"),
            opt("--voice", "voice", "a voice of GET /v1/audio/voices (default alloy)", default="alloy"),
            opt("--model", "model", "tts-1 (default), tts-1-hd, gpt-4o-mini-tts or piper", default="tts-1"),
            opt("--speed", "speed", "0.25 to 4", type=float),
        ),
        "file",
        "speech.wav",
        format_field="response_format",
        formats=SPEECH_FORMATS,
    ),
    Command(
        "clone",
        "speak a text in the voice of a recording (Qwen3-TTS)",
        "/v1/audio/clone",
        (
            arg("text", "what to say"),
            infile(
                "--ref", "ref_audio", "the reference recording (WAV, FLAC, MP3, Ogg; 0.5-60 s)", required=True
            ),
            opt("--ref-text", "ref_text", "what the recording says", required=True),
            opt("--language", "language", "English (default), Auto, ... (GET /v1/audio/clone/languages)"),
            SEED,
        ),
        "file",
        "cloned_voice.wav",
    ),
    Command(
        "music",
        "generate music from a prompt (ACE-Step)",
        "/v1/music/generate",
        (
            arg("prompt", "the style: genre, instruments, mood"),
            opt("--lyrics", "lyrics", 'lyrics with section tags ("[verse]", "[chorus]")'),
            opt("--duration", "duration", "seconds, 1-600 (default 30)", type=float),
            opt("--bpm", "bpm", "beats per minute, 30-300", type=int),
            opt("--key", "key_scale", 'e.g. "C Major", "F# minor"'),
            opt("--time-signature", "time_signature", 'e.g. "4/4"'),
            opt("--instrumental", "instrumental", "no vocals", action="store_const", const=True),
            opt("--steps", "num_inference_steps", "denoising steps (default 8)", type=int),
            SEED,
            MODEL,
        ),
        "media",
        "music.wav",
        progress=True,
        format_field="audio_format",
        formats=AUDIO_FORMATS,
        query={"response_format": "json"},
    ),
    Command(
        "video",
        "animate an image (Wan 2.2)",
        "/v1/images/img2video",
        (
            infile("image", "image", "the first frame (PNG, JPEG or WebP)"),
            arg("prompt", "how the picture should move"),
            opt("--frames", "num_frames", "4k+1 frames, 5-81 (default 81: 5 s at 16 fps)", type=int),
            opt("--steps", "num_steps", "denoising steps, 1-8 (default 4)", type=int),
            opt(
                "--resolution",
                "resolution",
                "480p (default), 720p or 1080p",
                choices=("480p", "720p", "1080p"),
            ),
            opt("--negative", "negative_prompt", "what to avoid"),
            SEED,
            MODEL,
        ),
        "media",
        "video.mp4",
        form=True,
        progress=True,
    ),
)


def _is_video(path: Path) -> bool:
    kind = mimetypes.guess_type(path.name)[0] or ""
    return kind.startswith("video/") or path.suffix.lower() in VIDEO_SUFFIXES


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ApiError(f"cannot read {path}: {exc.strerror or exc}") from None


def _fields(command: Command, args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the arguments give (files as bytes, with their names)."""
    values: dict[str, Any] = {}
    for spec in command.args:
        value = getattr(args, spec.dest)
        if value is None:
            continue
        values[spec.field] = (Path(value).name, _read(value)) if spec.file else value
    out = args.output
    if command.format_field and out and out != "-":
        suffix = Path(out).suffix.lower()
        if suffix in command.formats:
            values.setdefault(command.format_field, command.formats[suffix])
    return values


def _json_body(command: Command, values: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    files = {spec.field: spec.many for spec in command.args if spec.file}
    for name, value in values.items():
        if name in files:
            encoded = base64.b64encode(value[1]).decode("ascii")
            body[name] = [encoded] if files[name] else encoded
        else:
            body[name] = value
    return body


def _form(values: dict[str, Any]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in values.items():  # text fields first: a video's form wants its fields before the file
        if not isinstance(value, tuple):
            form.add_field(name, str(value).lower() if isinstance(value, bool) else str(value))
    for name, value in values.items():
        if isinstance(value, tuple):
            filename, data = value
            kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            form.add_field(name, data, filename=filename, content_type=kind)
    return form


def _numbered(out: Path, index: int) -> Path:
    return out if index == 0 else out.with_name(f"{out.stem}-{index + 1}{out.suffix}")


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB"):
        if count < 1000:
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000  # type: ignore[assignment]
    return f"{count:.1f} GB"


async def _write_images(api: Api, answer: dict[str, Any], out: Path) -> list[Reply]:
    """Each image of an images answer (``b64_json``, else fetched from ``url``)."""
    written = []
    for index, item in enumerate(answer.get("data", [])):
        path = _numbered(out, index) if str(out) != "-" else out
        if item.get("b64_json"):
            data = base64.b64decode(item["b64_json"])
            if str(path) == "-":
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            else:
                path.write_bytes(data)
            written.append(
                Reply(path=path, content_type=mimetypes.guess_type(path.name)[0] or "", size_bytes=len(data))
            )
        elif item.get("url"):
            written.append(await api.download(item["url"], path))
    return written


def _charged(reply: Reply) -> str:
    credits = reply.headers.get("X-Credits-Charged")
    if credits is None and isinstance(reply.json, dict) and reply.json.get("credits_charged") is not None:
        credits = str(reply.json["credits_charged"])
    if credits is None:
        return ""
    return f", {credits} credit{'' if credits == '1' else 's'} charged"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    if args.json and args.output == "-":
        raise ApiError("--json and -o - would both write to stdout; choose one")
    conn = connection(settings)
    values = _fields(command, args)
    path, default_out = command.path, command.out
    if command.video and "file" in values and _is_video(Path(values["file"][0])):
        path, default_out = command.video
    if command.format_field and args.output is None and command.format_field in values:
        default_out = str(Path(default_out).with_suffix(f".{values[command.format_field]}"))
    writes = args.output is not None or not args.json  # --json alone: print, write nothing
    out = Path(args.output or default_out) if writes else None
    query = {**command.query, **({"dry_run": "true"} if args.dry_run else {})}
    accept = {  # a file route may answer JSON when asked (segmentation's candidates): ask for the file
        "file": "*/*",
        "media": "application/json",
        "images": "application/json",
    }[command.answer]
    if command.progress:
        accept = "text/event-stream, application/json;q=0.9, */*;q=0.8"
    body = None if command.form else _json_body(command, values)
    form = _form(values) if command.form else None
    file_out = out or Path(default_out)  # a file answer is always written somewhere
    async with Api(conn) as api:
        with Bar(f"{command.name}", enabled=not args.json) as bar:
            reply = await api.call(
                path, body=body, form=form, query=query, accept=accept, out=file_out, bar=bar
            )
            if isinstance(reply.json, dict) and reply.json.get("object") == "price_preview":
                written: list[Reply] = []
            elif command.answer == "images" and out is not None:
                written = await _write_images(api, reply.json, out)
            elif command.answer == "media" and out is not None:
                written = [await api.download(reply.json["url"], out)]
            elif command.answer == "file" and reply.path is not None:
                written = [reply]
            else:
                written = []
    if args.json:
        print(json.dumps(reply.json if reply.json is not None else reply.describe(api.base_url)), flush=True)
    elif isinstance(reply.json, dict) and reply.json.get("object") == "price_preview":
        preview = reply.json
        enough = "" if preview.get("balance_sufficient", True) else " (more than the balance)"
        _say(f"dry run: would cost {preview['cost']} credits{enough}")
    for item in written if not args.json else ():
        where = "stdout" if str(item.path) == "-" else str(item.path)
        _say(f"wrote {where} ({item.content_type or 'file'}, {_size(item.size_bytes)}{_charged(reply)})")
    return 0


# ---------------------------------------------------------------- chat


async def chat(args: argparse.Namespace, settings: Settings) -> int:
    """A conversation: each line of stdin is a turn, the answer streams to stdout as it is
    generated and is kept for the next turn; ``--once`` asks one question and exits."""
    conn = connection(settings)
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    options = {
        name: value
        for name, value in (
            ("model", args.model),
            ("temperature", args.temperature),
            ("max_tokens", args.max_tokens),
        )
        if value is not None
    }
    interactive = args.once is None and sys.stdin.isatty()
    async with Api(conn) as api:
        while True:
            if args.once is not None:
                question = args.once
            else:
                try:
                    question = await asyncio.to_thread(input, "> " if interactive else "")
                except EOFError:  # Ctrl-D, or the end of piped input
                    if interactive:
                        print(flush=True)
                    return 0
                if not question.strip():
                    continue
            messages.append({"role": "user", "content": question})
            body = {**options, "messages": messages}
            if args.json:
                reply = await api.call("/v1/chat/completions", body=body)
                print(json.dumps(reply.json), flush=True)
                answer = reply.json["choices"][0]["message"].get("content") or ""
            else:
                parts = []
                async for chunk in api.stream("/v1/chat/completions", {**body, "stream": True}):
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content") or ""
                        parts.append(text)
                        sys.stdout.write(text)
                        sys.stdout.flush()
                print(flush=True)
                answer = "".join(parts)
            messages.append({"role": "assistant", "content": answer})
            if args.once is not None:
                return 0


# ---------------------------------------------------------------- the command line


def _main(
    work: Callable[[argparse.Namespace, Settings], Any],
) -> Callable[[argparse.Namespace, Settings], int]:
    def run_it(args: argparse.Namespace, settings: Settings) -> int:
        try:
            return int(asyncio.run(work(args, settings)))
        except ApiError as err:
            print(f"kiln: {err}", file=sys.stderr, flush=True)
            return 1

    return run_it


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the JSON answer (only that) on stdout")


def add_commands(commands: Any) -> None:
    """Adds the client commands to ``kiln``'s subcommands (``argparse`` subparsers)."""
    for command in COMMANDS:
        parser = commands.add_parser(
            command.name,
            help=f"{command.help} ({command.path})",
            description=f"{command.help}: POST {command.path}",
        )
        for spec in command.args:
            options = dict(spec.options)
            if spec.flags[0].startswith("-"):
                options["dest"] = spec.dest
                if "action" not in options:
                    options.setdefault("metavar", "FILE" if spec.file else spec.field.upper())
                parser.add_argument(*spec.flags, help=spec.help, **options)
            else:
                parser.add_argument(spec.dest, metavar=spec.flags[0].upper(), help=spec.help, **options)
        parser.add_argument(
            "-o", "--output", help=f"where to write the result ('-': stdout; default {command.out})"
        )
        parser.add_argument("--dry-run", action="store_true", help="print the price; run nothing")
        _common(parser)
        parser.set_defaults(func=_main(functools.partial(run, command)))
    talk = commands.add_parser(
        "chat",
        help="chat with a model, answers streamed (/v1/chat/completions; premium accounts)",
        description="Each line of stdin is a turn; the answer streams to stdout and the conversation "
        "is kept until the end of input. POST /v1/chat/completions (premium accounts).",
    )
    talk.add_argument("--once", metavar="QUESTION", help="ask one question, print the answer, exit")
    talk.add_argument("--model", help="a chat model id or alias (GET /v1/models)")
    talk.add_argument("--system", help="a system message that opens the conversation")
    talk.add_argument("--temperature", type=float, help="0 to 2; 0 is greedy")
    talk.add_argument("--max-tokens", type=int, help="most tokens per answer")
    _common(talk)
    talk.set_defaults(func=_main(chat))
