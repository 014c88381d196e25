"""The HTTP side of the client commands: one small aiohttp client for a running Kiln.

Where to connect and as whom (:func:`connection`): ``KILN_BASE_URL`` (else the
edge of this machine's settings, ``http://127.0.0.1:8000`` by default) and
``KILN_API_KEY`` (else the demo key ``kiln up`` saves in ``KILN_DATA_DIR``).
:meth:`Api.call` sends one request and reads any of the edge's answers: JSON,
a file (written to disk as it arrives), or server-sent ``progress`` events then
``result`` or ``error`` (``Accept: text/event-stream``), or a ``202`` task (a
long request the edge turned into one), polled until it ends. Every error the
edge answers becomes an :class:`ApiError` carrying the envelope's message.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from services.common.settings import Settings

#: Where the answer of a long job may take minutes: only connecting is bounded.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)
#: Written to disk in pieces of this size (a background-removed video can be large).
CHUNK = 256 * 1024
#: How often a task is polled when a long request was answered 202 (it became a task).
POLL_SECONDS = 1.0
#: The output of a task whose route answers a file (docs/api.md, "Tasks").
FILE_OUTPUT = frozenset({"url", "content_type", "size_bytes", "headers"})


class ApiError(Exception):
    """A refused or failed call, said in one line: the contract's message, then its type and status."""

    def __init__(self, message: str, *, kind: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())  # one line, whatever the server put in it
        self.kind = kind
        self.status = status

    def __str__(self) -> str:
        detail = ", ".join(
            part for part in (self.kind, f"HTTP {self.status}" if self.status else None) if part
        )
        return f"{self.message} ({detail})" if detail else self.message


def error_from(body: bytes, status: int | None) -> ApiError:
    """The error of an answer: the envelope ``{"error": {"message", "type"}}``, the tasks
    routes' ``{"data": {"message"}}``, or the text itself."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return ApiError(text or "the server answered an error without a message", status=status)
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        return ApiError(str(error.get("message", "")), kind=error.get("type"), status=status)
    if isinstance(data, dict) and isinstance(data.get("data"), dict) and "message" in data["data"]:
        return ApiError(str(data["data"]["message"]), status=status)
    return ApiError(json.dumps(data), status=status)


@dataclass(frozen=True)
class Connection:
    base_url: str
    api_key: str


def connection(settings: Settings, environ: Mapping[str, str] | None = None) -> Connection:
    """The Kiln to call and the key to call it with; :class:`ApiError` when there is no key."""
    from kiln_cli.main import DEMO_KEY_FILE

    environ = os.environ if environ is None else environ
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
    base_url = environ.get("KILN_BASE_URL") or f"http://{host}:{settings.http_port}"
    key = environ.get("KILN_API_KEY", "").strip()
    key_file = settings.data_dir / DEMO_KEY_FILE
    if not key and key_file.is_file():
        key = key_file.read_text().strip()
    if not key:
        raise ApiError(
            f"no API key: set KILN_API_KEY, or run `kiln up` here (it saves the demo key in {key_file})"
        )
    return Connection(base_url.rstrip("/"), key)


class Bar:
    """A progress bar on stderr for one long job, only on a terminal (and never with ``--json``).

    Pulses until the first ``progress`` event gives it a total, then counts the steps.
    """

    def __init__(self, description: str, *, enabled: bool) -> None:
        console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not (enabled and console.is_terminal),
        )
        self.task: TaskID = self.progress.add_task(description, total=None)

    def step(self, step: int, total: int) -> None:
        self.progress.update(self.task, completed=step, total=max(total, 1))

    def done(self) -> None:
        task = self.progress.tasks[0]
        if task.total is not None:
            self.progress.update(self.task, completed=task.total)

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.done()
        self.progress.stop()


@dataclass
class Reply:
    """A successful answer: JSON (the body, or an event stream's ``result``), or a file written to ``path``."""

    json: Any = None
    path: Path | None = None
    content_type: str = ""
    size_bytes: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)

    def describe(self, base_url: str) -> dict[str, Any]:
        """A file answer as JSON, shaped as a task's file output (``docs/api.md``)."""
        location = self.headers.get("Content-Location")
        return {
            "path": str(self.path),
            "url": urljoin(base_url + "/", location) if location else None,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "headers": {k: v for k, v in self.headers.items() if k.lower().startswith("x-")},
        }


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of a server-sent event stream (``message`` when unnamed)."""
    event, data = "message", ""
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, data
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
    if data:
        yield event, data


class Api:
    """One session with a running Kiln (use ``async with``)."""

    def __init__(self, conn: Connection) -> None:
        self.base_url = conn.base_url
        self.session = aiohttp.ClientSession(
            timeout=TIMEOUT, headers={"Authorization": f"Bearer {conn.api_key}", "User-Agent": "kiln-cli"}
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    def url(self, path: str) -> str:
        return urljoin(self.base_url + "/", path)

    async def call(
        self,
        path: str,
        *,
        body: Any = None,
        form: aiohttp.FormData | None = None,
        query: Mapping[str, str] | None = None,
        accept: str = "application/json, */*;q=0.8",
        out: Path | None = None,
        bar: Bar | None = None,
    ) -> Reply:
        """POSTs a JSON ``body`` or a ``form``; a file answer is written to ``out``."""
        try:
            async with self.session.post(
                self.url(path), json=body, data=form, params=query, headers={"Accept": accept}
            ) as response:
                if response.status >= 400:
                    raise error_from(await response.read(), response.status)
                if response.status == 202:  # a long request became a task (KILN_SYNC_WAIT_SECONDS)
                    task = await response.json()
                    where = response.headers.get("Location") or f"/v1/tasks/{task['task_id']}"
                    return await self._follow(where, task, bar, out)
                if response.content_type == "text/event-stream":
                    return await self._events(response, bar)
                if response.content_type == "application/json":
                    return Reply(json=await response.json(), headers=response.headers)
                if out is None:
                    raise ApiError(
                        f"the answer is a file ({response.content_type}): say where to write it with -o"
                    )
                size = await write(response, out)
                return Reply(
                    path=out, content_type=response.content_type, size_bytes=size, headers=response.headers
                )
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot reach Kiln at {self.base_url}: {exc or type(exc).__name__}") from None

    async def _events(self, response: aiohttp.ClientResponse, bar: Bar | None) -> Reply:
        async for event, data in sse_events(response):
            if event == "progress" and bar is not None:
                progress = json.loads(data)
                bar.step(int(progress.get("step", 0)), int(progress.get("total_steps", 0)))
            elif event == "result":
                return Reply(json=json.loads(data), headers=response.headers)
            elif event == "error":
                raise error_from(data.encode(), None)
        raise ApiError("the answer ended before its result", kind="processing_error")

    async def _follow(self, where: str, task: dict[str, Any], bar: Bar | None, out: Path | None) -> Reply:
        """Polls a task until it ends (its progress drives the bar); its output as the answer."""
        while task.get("status") in ("pending", "processing"):
            progress = task.get("progress") or {}
            if bar is not None and progress.get("total_steps"):
                bar.step(int(progress.get("step", 0)), int(progress["total_steps"]))
            await asyncio.sleep(POLL_SECONDS)
            async with self.session.get(self.url(where)) as response:
                if response.status >= 400:
                    raise error_from(await response.read(), response.status)
                task = (await response.json())["data"]
        if task.get("status") != "completed":
            if isinstance(task.get("error"), dict):
                raise error_from(json.dumps(task["error"]).encode(), None)
            raise ApiError(f"task {task.get('task_id')} ended {task.get('status')}")
        output = task.get("output")
        if isinstance(output, dict) and output.keys() <= FILE_OUTPUT and "url" in output and out is not None:
            return await self.download(output["url"], out)  # a file answer, stored by the task
        return Reply(json=output)

    async def download(self, url: str, out: Path) -> Reply:
        """A stored media file (``/v1/media/...``, public) written to ``out``."""
        try:
            async with self.session.get(self.url(url)) as response:
                if response.status >= 400:
                    raise error_from(await response.read(), response.status)
                size = await write(response, out)
                return Reply(
                    path=out, content_type=response.content_type, size_bytes=size, headers=response.headers
                )
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot fetch {url}: {exc or type(exc).__name__}") from None

    async def stream(self, path: str, body: Any) -> AsyncIterator[dict[str, Any]]:
        """The ``data:`` objects of a chat stream, up to ``[DONE]``; an in-band error is raised."""
        try:
            async with self.session.post(
                self.url(path), json=body, headers={"Accept": "text/event-stream"}
            ) as response:
                if response.status >= 400:
                    raise error_from(await response.read(), response.status)
                async for _, data in sse_events(response):
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise error_from(data.encode(), None)
                    yield chunk
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot reach Kiln at {self.base_url}: {exc or type(exc).__name__}") from None


async def write(response: aiohttp.ClientResponse, out: Path) -> int:
    """Writes a body to ``out`` as it arrives (``-`` is stdout); the bytes written."""
    size = 0
    if str(out) == "-":
        async for chunk in response.content.iter_chunked(CHUNK):
            sys.stdout.buffer.write(chunk)
            size += len(chunk)
        sys.stdout.buffer.flush()
        return size
    partial = out.with_name(out.name + ".part")
    try:
        with partial.open("wb") as file:
            async for chunk in response.content.iter_chunked(CHUNK):
                file.write(chunk)
                size += len(chunk)
        partial.replace(out)  # a failed download never leaves half a file under the asked name
    finally:
        partial.unlink(missing_ok=True)
    return size
