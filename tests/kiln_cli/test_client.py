"""The client commands (``kiln image``, ``speak``, ``chat``, ...) against the test mesh over
real HTTP: in-process through ``main`` (on a thread, the mesh runs on this loop), and as a
child process in a pseudo-terminal for the progress bar."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from kiln_cli.client.api import ApiError, connection
from kiln_cli.main import DEMO_KEY_FILE, main
from services.common.media.audio import encode_audio
from services.common.settings import load_settings
from tests.conftest import Mesh, new_customer
from tests.edge.images_util import png_bytes
from tests.edge.media_util import moving_square_video, object_png

#: The client only speaks HTTP: one database is enough.
SQLITE = pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
ROOT = Path(__file__).resolve().parents[2]
PREMIUM_MESSAGE = (
    "This endpoint requires a premium subscription. "
    "Please upgrade to access LLM generation with vision support."
)
UNKNOWN_KEY = "Authentication failed. Provide a valid API Key in the 'X-API-Key' header or log in."


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No key or URL from the machine running the tests; an empty data folder (no demo key)."""
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    monkeypatch.delenv("KILN_BASE_URL", raising=False)
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KILN_LOG_LEVEL", "WARNING")
    yield monkeypatch


async def kiln(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    """Runs ``kiln ARGV`` in this process (on a thread: the mesh serves on this loop)."""
    capsys.readouterr()
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = await asyncio.to_thread(main, list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def said(err: str) -> list[str]:
    """The client's lines of stderr (the mesh in this process logs there too, lines without
    an end among them)."""
    return re.findall(r"(?:kiln: |wrote |dry run: ).*", err)


async def customer_env(mesh: Mesh, env: pytest.MonkeyPatch, *, premium: bool = False) -> str:
    customer = await new_customer(mesh, "50", premium=premium)
    env.setenv("KILN_BASE_URL", mesh.url)
    env.setenv("KILN_API_KEY", customer.key)
    return customer.key


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2").tobytes()
    return encode_audio(pcm, rate, "wav")[0]


def test_the_connection_comes_from_the_environment_else_the_settings_and_the_demo_key(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, http_host="0.0.0.0", http_port=9123)
    with pytest.raises(ApiError, match="no API key: set KILN_API_KEY"):
        connection(settings, {})
    (tmp_path / DEMO_KEY_FILE).write_text("sk-kiln-demo\n")
    assert connection(settings, {}) == type(connection(settings, {}))("http://127.0.0.1:9123", "sk-kiln-demo")
    chosen = connection(settings, {"KILN_BASE_URL": "https://kiln.example/", "KILN_API_KEY": "sk-other"})
    assert (chosen.base_url, chosen.api_key) == ("https://kiln.example", "sk-other")


@SQLITE
async def test_image_writes_a_png_of_the_asked_size(
    mesh: Mesh, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await customer_env(mesh, env)
    fox = tmp_path / "fox.png"
    code, out, err = await kiln(
        capsys, "image", "a red fox", "--size", "256x256", "--steps", "2", "-o", str(fox)
    )
    assert code == 0, err
    assert Image.open(fox).size == (256, 256) and Image.open(fox).format == "PNG"
    assert out == "" and f"wrote {fox} (image/png" in err and "credits" in err
    # -o's suffix picks the format; -n numbers the files
    code, out, err = await kiln(
        capsys,
        "image",
        "a red fox",
        "--size",
        "256x256",
        "--steps",
        "1",
        "-n",
        "2",
        "-o",
        str(tmp_path / "f.jpg"),
    )
    assert code == 0, err
    assert [Image.open(tmp_path / name).format for name in ("f.jpg", "f-2.jpg")] == ["JPEG", "JPEG"]


@SQLITE
async def test_json_prints_only_the_answer(
    mesh: Mesh, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await customer_env(mesh, env)
    env.chdir(tmp_path)  # nothing may be written without -o
    code, out, err = await kiln(capsys, "image", "a fox", "--size", "256x256", "--steps", "1", "--json")
    assert code == 0, err
    answer = json.loads(out)
    image = Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
    assert image.size == (256, 256) and answer["data"][0]["url"].startswith(mesh.url)
    assert os.listdir(tmp_path) == []
    # a dry run: the price preview
    code, out, err = await kiln(capsys, "image", "a fox", "--size", "256x256", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["object"] == "price_preview"
    code, out, err = await kiln(capsys, "image", "a fox", "--size", "256x256", "--dry-run")
    assert code == 0 and out == "" and said(err)[0].startswith("dry run: would cost ")


@SQLITE
async def test_an_error_is_the_contracts_message_on_one_line_and_status_1(
    mesh: Mesh, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = await customer_env(mesh, env)
    body = {"prompt": "a fox", "image_size": "13x13"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{mesh.url}/v1/images/generations", json=body, headers={"X-API-Key": key}) as response,
    ):
        message = (await response.json())["error"]["message"]
    # a child process, as a script runs it: its stderr is that one line, its stdout empty
    argv = ["image", "a fox", "--size", "13x13", "-o", str(tmp_path / "x.png")]
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kiln_cli.main", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert (child.returncode, child.stdout) == (1, "")
    assert child.stderr == f"kiln: {message} (invalid_request_error, HTTP 400)\n"
    assert not (tmp_path / "x.png").exists()
    # an unknown key, a missing file, nothing listening, no key at all: one line each, status 1
    # (in this process, where the mesh's services may log to stderr too: the client's lines)
    env.setenv("KILN_API_KEY", "sk-kiln-nope")
    code, _, err = await kiln(capsys, "image", "a fox", "--size", "256x256", "-o", str(tmp_path / "x.png"))
    assert code == 1 and said(err) == [f"kiln: {UNKNOWN_KEY} (authentication_error, HTTP 401)"]
    code, _, err = await kiln(capsys, "upscale", str(tmp_path / "missing.png"))
    assert code == 1 and said(err) == [
        f"kiln: cannot read {tmp_path / 'missing.png'}: No such file or directory"
    ]
    env.setenv("KILN_BASE_URL", "http://127.0.0.1:9")
    code, _, err = await kiln(capsys, "speak", "hi", "-o", str(tmp_path / "x.wav"))
    assert code == 1 and [line[:47] for line in said(err)] == [
        "kiln: cannot reach Kiln at http://127.0.0.1:9: "
    ]
    env.delenv("KILN_API_KEY")  # and no demo key file
    code, _, err = await kiln(capsys, "image", "a fox")
    assert code == 1 and [line[:37] for line in said(err)] == ["kiln: no API key: set KILN_API_KEY, o"]
    # a bad command line is argparse's: status 2
    with pytest.raises(SystemExit) as exit:
        await kiln(capsys, "image", "a fox", "--steps", "many")
    assert exit.value.code == 2


@SQLITE
async def test_the_demo_key_file_is_used_without_kiln_api_key(
    mesh: Mesh, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = await customer_env(mesh, env)
    env.delenv("KILN_API_KEY")
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / DEMO_KEY_FILE).write_text(key + "\n")
    code, out, err = await kiln(capsys, "speak", "Hello.", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["object"] == "price_preview"


@SQLITE
async def test_upscale_segment_and_speak_write_their_files(
    mesh: Mesh, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await customer_env(mesh, env)
    source = tmp_path / "small.png"
    source.write_bytes(png_bytes(64, 48))
    big = tmp_path / "big.png"
    code, _, err = await kiln(
        capsys, "upscale", str(source), "--method", "lanczos", "--scale", "2", "-o", str(big)
    )
    assert code == 0, err
    assert Image.open(big).size == (128, 96)

    (tmp_path / "in.png").write_bytes(object_png(160, 120))
    cut = tmp_path / "cut.png"
    code, _, err = await kiln(
        capsys, "segment", str(tmp_path / "in.png"), "--prompt", "red disc", "-o", str(cut)
    )
    assert code == 0, err
    assert Image.open(cut).size == (160, 120) and Image.open(cut).mode == "RGBA"

    wav = tmp_path / "hello.wav"
    code, out, err = await kiln(capsys, "speak", "Hello from Kiln.", "-o", str(wav))  # .wav: response_format
    assert code == 0, err
    data = wav.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) > 1000
    assert f"wrote {wav} (audio/wav" in err
    code, out, err = await kiln(capsys, "speak", "Hello.", "-o", str(tmp_path / "h.mp3"), "--json")
    assert code == 0, err
    described = json.loads(out)
    assert described["content_type"] == "audio/mpeg" and described["path"] == str(tmp_path / "h.mp3")
    assert described["size_bytes"] == (tmp_path / "h.mp3").stat().st_size > 0


@SQLITE
async def test_every_upload_command_builds_its_request(
    mesh: Mesh, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Dry runs of the commands not run for real above: the edge checks each request exactly as
    the real call (so a wrong field, form or file would be a 400) and answers its price."""
    await customer_env(mesh, env)
    (tmp_path / "in.png").write_bytes(object_png())
    (tmp_path / "clip.mp4").write_bytes(moving_square_video(frames=6))
    (tmp_path / "ref.wav").write_bytes(_wav(2.0))
    (tmp_path / "frame.png").write_bytes(png_bytes(208, 120))
    runs: list[tuple[list[str], tuple[str, int | None]]] = [  # the item priced: kind, frames
        (["edit", "in.png", "make it blue", "--size", "256x256"], ("image_edit", None)),
        (["segment", "in.png", "--prompt", "red disc", "--mask"], ("segmentation", 1)),
        (["remove-bg", "in.png", "--prompt", "red disc"], ("segmentation", 1)),
        (["remove-bg", "clip.mp4", "--prompt", "blue square"], ("segmentation", 6)),  # the video route
        (["clone", "Hi.", "--ref", "ref.wav", "--ref-text", "Reference text here"], ("speech", None)),
        (["music", "calm piano", "--duration", "1", "--steps", "2", "--key", "C Major"], ("music", None)),
        (["video", "frame.png", "a pan", "--frames", "5", "--steps", "2"], ("video", None)),
    ]
    env.chdir(tmp_path)
    priced: list[tuple[str, int | None]] = []
    for argv, _ in runs:
        code, out, err = await kiln(capsys, *argv, "--dry-run", "--json")
        assert code == 0, (argv, err)
        preview = json.loads(out)
        assert preview["object"] == "price_preview"
        priced.extend((item["kind"], item.get("frames")) for item in preview["items"])
    assert priced == [item for _, item in runs]


@SQLITE
async def test_chat_once_streams_the_answer_and_a_conversation_is_kept(
    mesh: Mesh, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await customer_env(mesh, env, premium=True)
    code, out, err = await kiln(capsys, "chat", "--once", "hi", "--max-tokens", "4", "--temperature", "0")
    assert code == 0, err
    assert out.endswith("\n") and len(out) > 1
    # two turns from stdin, as JSON: the second prompt holds the first turn and its answer
    code, out, err = await kiln(
        capsys, "chat", "--max-tokens", "4", "--temperature", "0", "--json", stdin="hi\n\nand again\n"
    )
    assert code == 0, err
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["object"] == second["object"] == "chat.completion"
    assert (
        second["usage"]["prompt_tokens"]
        > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    )
    # not premium: the contract's 403, one line
    await customer_env(mesh, env)
    code, out, err = await kiln(capsys, "chat", "--once", "hi")
    assert (code, out) == (1, "")
    assert said(err) == [f"kiln: {PREMIUM_MESSAGE} (premium_required, HTTP 403)"]


def _in_a_terminal(
    argv: list[str], env: dict[str, str], cwd: Path, typed: bytes = b"", timeout: float = 240
) -> tuple[int, str]:
    """Runs ``kiln ARGV`` with stdin, stdout and stderr on a pseudo-terminal, ``typed`` at its
    keyboard; (status, what it showed)."""
    controller, terminal = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "kiln_cli.main", *argv],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        cwd=cwd,
        close_fds=True,
    )
    os.close(terminal)
    os.write(controller, typed)  # the terminal holds it until the child reads
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every end of the terminal is closed (the child exited)
                break
            if not chunk:
                break
            shown += chunk
        code = child.wait(timeout)
    finally:
        os.close(controller)
        if child.poll() is None:
            child.kill()
    return code, shown.decode("utf-8", "replace")


@SQLITE
async def test_a_progress_bar_in_a_terminal(mesh: Mesh, tmp_path: Path) -> None:
    customer = await new_customer(mesh, "50")
    env = {
        **os.environ,
        "KILN_BASE_URL": mesh.url,
        "KILN_API_KEY": customer.key,
        "KILN_DATA_DIR": str(tmp_path / "data"),
        "KILN_LOG_LEVEL": "WARNING",
        "TERM": "xterm-256color",
        "COLUMNS": "100",
    }
    song = tmp_path / "song.wav"
    argv = ["music", "calm piano", "--duration", "1", "--steps", "3", "-o", str(song)]
    code, shown = await asyncio.to_thread(_in_a_terminal, argv, env, ROOT)
    assert code == 0, shown
    assert "━" in shown and "100%" in shown and "music" in shown  # rich's bar, counted to the end
    assert f"wrote {song} (audio/wav" in shown
    assert song.read_bytes()[:4] == b"RIFF"
    # --json: no bar even on a terminal, only the answer
    code, shown = await asyncio.to_thread(_in_a_terminal, [*argv, "--json"], env, ROOT)
    assert code == 0, shown
    assert "━" not in shown and json.loads(shown)["audio_format"] == "wav"
    # kiln chat on a terminal: a prompt, the streamed answer, Ctrl-D ends it
    premium = await new_customer(mesh, "0", premium=True)
    chat = ["chat", "--max-tokens", "4", "--temperature", "0"]
    code, shown = await asyncio.to_thread(
        _in_a_terminal, chat, env | {"KILN_API_KEY": premium.key}, ROOT, b"hi\n\x04"
    )
    assert code == 0, shown
    assert shown.startswith("hi\r\n> ") or shown.startswith("> "), shown  # the echo may come first
    assert shown.count("> ") >= 2 and "kiln:" not in shown, shown  # asked again after the answer


async def test_a_request_answered_as_a_task_is_followed_to_its_end(
    aiohttp_server: Any, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A long request the edge turned into a task (202, KILN_SYNC_WAIT_SECONDS): the client polls
    it, and writes its output (JSON images, or a file stored by the task); a failed task's error
    is the one line. An edge of our own, answering as the tasks routes do."""
    env.setattr("kiln_cli.client.api.POLL_SECONDS", 0.01)
    polls: dict[str, int] = {}
    image = base64.b64encode(png_bytes(32, 16)).decode()
    outputs = {
        "/v1/images/upscale": {"data": [{"b64_json": image}]},
        "/v1/audio/speech": {
            "url": "/v1/media/m1",
            "content_type": "audio/wav",
            "size_bytes": 4,
            "headers": {},
        },
    }

    async def start(request: web.Request) -> web.Response:
        task_id = request.path.replace("/", "_")
        return web.json_response(
            {"task_id": task_id, "status": "processing"},
            status=202,
            headers={"Location": f"/v1/tasks/{task_id}"},
        )

    async def task(request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        polls[task_id] = polls.get(task_id, 0) + 1
        state: dict[str, Any] = {
            "task_id": task_id,
            "status": "processing",
            "progress": {"step": 1, "total_steps": 2},
        }
        if polls[task_id] > 2:
            route = task_id.replace("_", "/")
            if route in outputs:
                state = {"task_id": task_id, "status": "completed", "output": outputs[route]}
            else:
                error = {"message": "The model ran out of patience.", "type": "processing_error"}
                state = {"task_id": task_id, "status": "failed", "error": {"error": error}}
        return web.json_response({"code": 200, "success": True, "data": state})

    async def media(request: web.Request) -> web.Response:
        return web.Response(body=b"RIFF", content_type="audio/wav")

    app = web.Application()
    app.router.add_post("/v1/images/upscale", start)
    app.router.add_post("/v1/audio/speech", start)
    app.router.add_post("/v1/images/generations", start)
    app.router.add_get("/v1/tasks/{task_id}", task)
    app.router.add_get("/v1/media/{media_id}", media)
    server = await aiohttp_server(app)
    env.setenv("KILN_BASE_URL", str(server.make_url("")))
    env.setenv("KILN_API_KEY", "sk-kiln-test")
    (tmp_path / "in.png").write_bytes(png_bytes(16, 8))

    code, _, err = await kiln(capsys, "upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "up.png"))
    assert code == 0, err
    assert Image.open(tmp_path / "up.png").size == (32, 16)
    code, _, err = await kiln(capsys, "speak", "hi", "-o", str(tmp_path / "hi.wav"))
    assert code == 0, err
    assert (tmp_path / "hi.wav").read_bytes() == b"RIFF"
    code, _, err = await kiln(capsys, "image", "a fox", "-o", str(tmp_path / "fox.png"))
    assert (code, said(err)) == (1, ["kiln: The model ran out of patience. (processing_error)"])
    assert polls == {"_v1_images_upscale": 3, "_v1_audio_speech": 3, "_v1_images_generations": 3}
