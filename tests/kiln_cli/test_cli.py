"""The `kiln` command: port checks, the demo account and the admin tools."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln_cli.main import SERVICES, PortTaken, build_parser, check_ports
from services.common.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def _kiln(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln_cli.main", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_kiln_up_exits_non_zero_with_a_clear_message_when_the_http_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the other services on port 0 (not checked): their default ports may be in use as
        # ephemeral client ports on a busy machine
        others = {f"KILN_{name.upper()}_ADDRESS": "127.0.0.1:0" for name in SERVICES if name != "edge"}
        env = {"KILN_DATA_DIR": str(tmp_path), "KILN_HTTP_PORT": str(port), **others}
        result = _kiln(["up"], env)
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 (edge) is already in use" in result.stderr
    assert "KILN_HTTP_PORT" in result.stderr


def test_check_ports_names_the_grpc_service_and_its_variable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = load_settings(data_dir=tmp_path, addresses={"billing": address})
        with pytest.raises(PortTaken, match="KILN_BILLING_ADDRESS"):
            check_ports(settings, ("billing", "image_gen", "edge"))


def _port_in_time_wait() -> int:
    """A port whose only socket is a closed connection in TIME-WAIT, as a stopped mesh leaves."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server side closes first: its end waits in TIME-WAIT
            assert client.recv(1) == b""
    for _ in range(100):  # the client's FIN moves the server's end to TIME-WAIT
        with socket.socket() as plain:
            try:
                plain.bind(("127.0.0.1", port))
            except OSError:
                return port
        time.sleep(0.01)
    pytest.fail(f"no TIME-WAIT socket on port {port}: a bind without SO_REUSEADDR succeeded")


def test_check_ports_passes_a_port_left_in_time_wait_and_fails_a_listener(tmp_path: Path) -> None:
    port = _port_in_time_wait()
    settings = load_settings(data_dir=tmp_path, http_host="127.0.0.1", http_port=port)
    check_ports(settings, ("edge",))  # Ctrl-C then `make run` again: starts at once
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with pytest.raises(PortTaken, match=f"port {port} on 127.0.0.1 \\(edge\\) is already in use"):
            check_ports(settings, ("edge",))


def test_admin_commands_manage_accounts_keys_and_credits(tmp_path: Path) -> None:
    env = {"KILN_DATA_DIR": str(tmp_path)}
    created = _kiln(["admin", "account", "create", "--name", "acme"], env)
    assert created.returncode == 0, created.stderr
    account_id = created.stdout.split()[-1]
    key = _kiln(["admin", "key", "create", account_id], env)
    assert key.returncode == 0, key.stderr
    assert key.stdout.strip().startswith("sk-kiln-")
    bought = _kiln(["admin", "credits", "add", account_id, "1000"], env)
    assert bought.returncode == 0, bought.stderr
    assert "10%" in bought.stdout and "$9.00" in bought.stdout
    shown = _kiln(["admin", "account", "show", account_id], env)
    assert "1000" in shown.stdout


def test_the_parser_knows_every_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["up", "--split"]).split is True
    assert parser.parse_args(["serve", "image_gen"]).service == "image_gen"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "nothing"])


async def test_the_demo_key_is_kept_between_starts_and_tops_up_credits(tmp_path: Path) -> None:
    from kiln_cli.main import DEMO_KEY_FILE, _demo_key

    settings = load_settings(data_dir=tmp_path)
    key, balance = await _demo_key(settings)
    assert balance == "1000"
    assert (tmp_path / DEMO_KEY_FILE).read_text().strip() == key
    assert (tmp_path / DEMO_KEY_FILE).stat().st_mode & 0o777 == 0o600
    again, _ = await _demo_key(settings)
    assert again == key
    fixed, _ = await _demo_key(load_settings(data_dir=tmp_path, demo_api_key="sk-kiln-fixed-demo-key"))
    assert fixed == "sk-kiln-fixed-demo-key"


def test_envoy_config_writes_a_config_and_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from kiln_cli.main import main

    monkeypatch.setenv("KILN_TTS_ADDRESS", "127.0.0.1:6001")
    assert main(["envoy-config", "--out", str(tmp_path), "--services-port", "9091"]) == 0
    config = json.loads((tmp_path / "kiln-envoy.json").read_text())
    assert (tmp_path / "kiln-descriptors.binpb").stat().st_size > 10_000
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert "billing" not in clusters and {"edge", "image_gen", "tts", "music", "video"} <= set(clusters)
    tts = clusters["tts"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert tts["socket_address"] == {"address": "127.0.0.1", "port_value": 6001}
    listeners = {item["name"]: item for item in config["static_resources"]["listeners"]}
    assert listeners["services"]["address"]["socket_address"]["port_value"] == 9091
    assert main(["envoy-config", "--out", str(tmp_path), "--expose-billing"]) == 0
    exposed = json.loads((tmp_path / "kiln-envoy.json").read_text())
    assert "billing" in {c["name"] for c in exposed["static_resources"]["clusters"]}


async def test_a_child_service_that_dies_stops_kiln_up(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln_cli.main import watch_child

    stopped: list[str] = []
    child = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", "raise SystemExit(3)"])
    assert await watch_child("tts", child, stopped.append) == 3
    assert stopped == ["tts"]
    assert "kiln: tts exited with status 3; stopping the others" in capsys.readouterr().err
