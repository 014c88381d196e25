"""``kiln up | serve <service> | admin ...``.

``kiln up`` runs every service and the HTTP edge in one process (or, with
``--split``, one process each, as containers would), on the embedded defaults:
SQLite and local media under ``KILN_DATA_DIR`` (``.kiln``) and tiny
random-weight models. It makes sure a demo account exists and prints the URL
and the demo API key. ``kiln serve <service>`` runs one service, as a container
does. ``kiln admin`` manages accounts, keys, credits and maintenance mode.
``kiln image``, ``kiln chat`` and the other client commands call a running Kiln
over HTTP (:mod:`kiln_cli.client`).

The services come from the catalog (:mod:`services.catalog`). A service
with an environment of its own (the catalog says which: the tts service's
Qwen3-TTS ``qwen-tts`` pins transformers 4.57.3, so ``make`` installs it in
``.venv-tts``) always runs as a child process on that environment's Python
(:func:`service_python`), in ``kiln up`` as well as ``kiln up --split``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

from kiln_cli import containers, health
from kiln_cli.notices import quiet_expected_notices
from services.catalog import CATALOG, capability
from services.common.grpc_server import GrpcService
from services.common.money import format_credits
from services.common.settings import Settings, load_settings
from services.common.telemetry import setup_tracing

log = logging.getLogger("kiln")

#: Every process ``kiln serve`` can run: the catalog's services, then the edge.
SERVICES = (*(entry.name for entry in CATALOG), "edge")
#: The checkout (where `make` creates the environments).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def service_python(name: str, settings: Settings) -> str:
    """The Python a service runs on: its environment's own (``KILN_<ENV>_PYTHON``, else
    ``.venv-<env>`` of the checkout) when the catalog gives it one that exists."""
    environment = "main" if name == "edge" else capability(name).environment
    if environment != "main":
        if environment in settings.pythons:
            return str(settings.pythons[environment])
        own = PROJECT_ROOT / f".venv-{environment}" / "bin" / "python"
        if own.exists():
            return str(own)
    return sys.executable


def own_environment(settings: Settings) -> tuple[str, ...]:
    """The services that must run on another Python than this process's."""
    return tuple(name for name in SERVICES if service_python(name, settings) != sys.executable)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for child services started on a free port)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn_service(
    name: str, settings: Settings, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Starts ``kiln serve <name>`` as a child process on the service's Python.

    ``env`` adds to this process's environment (``KILN_*`` settings).
    """
    return subprocess.Popen(
        [service_python(name, settings), "-m", "kiln_cli.main", "serve", name],
        env={**os.environ, **(env or {})},
        cwd=PROJECT_ROOT,
    )


class PortTaken(Exception):
    pass


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_ports(settings: Settings, services: tuple[str, ...]) -> None:
    """Fails with a clear message when a port we need is already in use."""
    wanted = {
        entry.name: (
            _split_address(settings.bind_address(settings.address(entry.name))),
            entry.address_variable,
        )
        for entry in CATALOG
    }
    wanted["edge"] = ((settings.http_host, settings.http_port), "KILN_HTTP_PORT")
    for name in services:
        (host, port), variable = wanted[name]
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As the servers themselves bind (aiohttp and gRPC set SO_REUSEADDR): the
            # connections of a mesh stopped a moment ago, in TIME-WAIT for a minute, do not
            # make the port look taken; a socket listening on it still does (on Unix,
            # SO_REUSEADDR never lets two sockets listen on one port).
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise PortTaken(
                        f"kiln: port {port} on {host} ({name}) is already in use. "
                        f"Stop whatever holds it, or choose another port with {variable}."
                    ) from None
                raise


#: Where `kiln up` keeps the demo key when KILN_DEMO_API_KEY is unset, so that
#: scripts and the README's example can read it: ``$(cat .kiln/demo-api-key)``.
DEMO_KEY_FILE = "demo-api-key"


async def _demo_key(settings: Settings) -> tuple[str, str]:
    """The demo account's key (KILN_DEMO_API_KEY, else the saved one, else a new one)."""
    from services.billing.admin import ensure_demo_account
    from services.billing.ledger import Ledger
    from services.billing.store import Database
    from services.common.errors import KilnError

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key_file = settings.data_dir / DEMO_KEY_FILE
    saved = key_file.read_text().strip() if key_file.is_file() else None
    db = await Database.open(settings.resolved_database_url)
    try:
        ledger = Ledger(db)
        credits, premium = Decimal(settings.demo_credits), settings.demo_premium
        if settings.demo_api_key:
            account, key = await ensure_demo_account(
                ledger, api_key=settings.demo_api_key, credits=credits, premium=premium
            )
        else:
            try:
                account, key = await ensure_demo_account(
                    ledger, api_key=saved, credits=credits, premium=premium
                )
            except KilnError:  # the saved key was revoked or belongs elsewhere: make a new one
                account, key = await ensure_demo_account(
                    ledger, api_key=None, credits=credits, premium=premium
                )
            key_file.touch(mode=0o600)
            key_file.write_text(key + "\n")
    finally:
        await db.close()
    return key, format_credits(account.balance)


async def _create_grpc_service(name: str, settings: Settings) -> GrpcService:
    return await capability(name).create(settings)


async def _start_edge(settings: Settings) -> web.AppRunner:
    from edge.app import start_edge

    runner, _ = await start_edge(settings, settings.http_host, settings.http_port, access_log=None)
    return runner


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve(settings: Settings, names: tuple[str, ...], on_ready: Callable[[], Awaitable[None]]) -> None:
    grpc_services: list[GrpcService] = []
    billing: GrpcService | None = None
    runner: web.AppRunner | None = None
    try:
        for name in names:
            if name != "edge":
                grpc_services.append(await _create_grpc_service(name, settings))
                if capability(name).billing:
                    billing = grpc_services[-1]
        # Started only once every service is built: a started service loads its models on
        # worker threads, and the imports still to run here (diffusers' lazy modules, not
        # safe to resolve from two threads at once) must not race with them.
        for service in grpc_services:
            await service.start()
        if "edge" in names:
            runner = await _start_edge(settings)
        await on_ready()
        await _wait_for_signal()
        log.info("shutting down (grace %.0f s)", settings.grace_seconds)
    finally:
        # The edge first (in-flight requests finish or release their holds), billing last.
        if runner is not None:
            await runner.cleanup()
        await asyncio.gather(*(s.stop(settings.grace_seconds) for s in grpc_services if s is not billing))
        if billing is not None:
            await billing.stop(settings.grace_seconds)


def _banner(settings: Settings, key: str, balance: str) -> str:
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
    url = f"http://{host}:{settings.http_port}"
    return (
        f"\nKiln is up at {url}\n"
        f"Demo API key: {key}  (balance {balance} credits, premium: {str(settings.demo_premium).lower()})\n"
        f"Try:\n  curl -s {url}/v1/images/generations -H 'X-API-Key: {key}' "
        '-H \'Content-Type: application/json\' -d \'{"prompt": "a red fox", "image_size": "256x256"}\'\n'
        f"Models load in the background; {url}/readyz says when they are ready. Ctrl-C stops.\n"
    )


async def _wait_ready(settings: Settings) -> None:
    from edge.clients import Upstreams

    upstreams = Upstreams.connect(settings)
    try:
        while True:
            if all((await upstreams.health()).values()):
                break
            await asyncio.sleep(0.5)
    finally:
        await upstreams.close()
    print("All services are ready.", flush=True)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    check_ports(settings, SERVICES)
    key, balance = asyncio.run(_demo_key(settings))
    if args.split:
        return _run_split(settings, key, balance)
    setup_tracing(settings, "kiln")

    separate = own_environment(settings)
    children = {name: spawn_service(name, settings) for name in separate}
    failed: list[str] = []

    def stop(name: str) -> None:  # a child died: stop the whole mesh, with a failing status
        failed.append(name)
        os.kill(os.getpid(), signal.SIGTERM)

    background: list[asyncio.Task[Any]] = []

    async def ready() -> None:
        print(_banner(settings, key, balance), flush=True)
        loop = asyncio.get_running_loop()
        background.append(loop.create_task(_wait_ready(settings)))
        background.extend(loop.create_task(watch_child(n, c, stop)) for n, c in children.items())

    try:
        asyncio.run(_serve(settings, tuple(n for n in SERVICES if n not in separate), ready))
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=settings.grace_seconds + 5)
            if child.poll() is None:
                child.kill()
    return 1 if failed else 0


async def watch_child(name: str, child: subprocess.Popen[bytes], stop: Callable[[str], None]) -> int:
    """Waits for a child service to exit; then says so and calls ``stop(name)``. Returns its status."""
    while True:  # polled: a thread blocked in wait() would hold up the event loop's shutdown
        status = child.poll()
        if status is not None:
            break
        await asyncio.sleep(0.5)
    print(f"kiln: {name} exited with status {status}; stopping the others", file=sys.stderr)
    stop(name)
    return status


def _run_split(settings: Settings, key: str, balance: str) -> int:
    """One child process per service; if one dies, the others are stopped."""
    children = {name: spawn_service(name, settings) for name in SERVICES}
    print(_banner(settings, key, balance), flush=True)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        stop_in_order(children, settings.grace_seconds)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while children:
        for name, child in list(children.items()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = child.wait(timeout=0.2)
                del children[name]
                if not stopping:
                    print(f"kiln: {name} exited with status {rc}; stopping the others", file=sys.stderr)
                    code = rc or 1
                    stop(signal.SIGTERM, None)
    return code


def stop_in_order(children: dict[str, subprocess.Popen[bytes]], grace_seconds: float) -> None:
    """SIGTERM to the edge first and wait for it (it finishes or releases in-flight
    requests), then the capability services, and billing last (it must outlive the
    edge's commits and releases)."""
    groups = (
        [name for name in children if name == "edge"],
        [name for name in children if name != "edge" and not capability(name).billing],
        [name for name in children if name != "edge" and capability(name).billing],
    )
    for group in groups:
        running = [children[name] for name in group if children[name].poll() is None]
        for child in running:
            child.send_signal(signal.SIGTERM)
        for child in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=grace_seconds + 10)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    name = args.service or os.environ.get(health.SERVICE_VARIABLE, "")
    if name not in SERVICES:
        print(f"kiln serve: name a service ({', '.join(SERVICES)}) or set KILN_SERVICE", file=sys.stderr)
        return 2
    check_ports(settings, (name,))
    from services.common.mesh_auth import SECRET_FILE

    if settings.mesh_secret is None and not (settings.data_dir / SECRET_FILE).exists():
        log.warning(
            "no KILN_MESH_SECRET and no %s: this service makes a new mesh secret; every other "
            "process of the mesh must share it (set one KILN_MESH_SECRET on every machine)",
            settings.data_dir / SECRET_FILE,
        )
    setup_tracing(settings, f"kiln-{name}")

    async def ready() -> None:
        log.info("%s is listening", name)

    asyncio.run(_serve(settings, (name,), ready))
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    """Prints the mesh token of an identity (for grpcurl or a backend calling the services)."""
    from services.common.mesh_auth import EDGE, MeshSecretError, mesh_secret, mesh_token

    if args.identity == EDGE and not args.edge:
        print(
            "kiln: the 'edge' identity may move money (billing's Authorize, Commit, ...); "
            "give backends another identity, or pass --edge if you mean it",
            file=sys.stderr,
        )
        return 2
    try:
        print(mesh_token(mesh_secret(settings), args.identity))
    except (MeshSecretError, ValueError) as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    from services.billing.admin import run_admin

    return asyncio.run(run_admin(args, settings))


def cmd_envoy_config(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from kiln_cli.envoy import build_descriptor_set, render_envoy_config

    if args.deploy:  # the deployment files' config (kiln_cli/deploy.py), not this mesh's
        from kiln_cli.deploy import write_envoy

        written = write_envoy(args.out or Path("envoy"))
        print(f"wrote {', '.join(map(str, written))}")
        return 0
    args.out = args.out or Path(".kiln/envoy")
    args.out.mkdir(parents=True, exist_ok=True)
    descriptor = build_descriptor_set((args.out / "kiln-descriptors.binpb").resolve())
    config = render_envoy_config(
        settings,
        descriptor=descriptor,
        public_port=args.public_port,
        services_host=args.services_host,
        services_port=args.services_port,
        expose_billing=args.expose_billing,
    )
    target = args.out / "kiln-envoy.json"
    target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target} and {descriptor}; run: envoy -c {target}")
    return 0


def cmd_deploy_files(args: argparse.Namespace, settings: Settings) -> int:
    from kiln_cli.deploy import write_deploy_files

    for path in write_deploy_files(args.root):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kiln_cli.client import add_commands as add_client_commands
    from services.billing.admin import add_admin_commands

    parser = argparse.ArgumentParser(prog="kiln", description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the whole mesh on this machine")
    up.add_argument("--split", action="store_true", help="one process per service")
    up.set_defaults(func=cmd_up)
    serve = commands.add_parser("serve", help="run one service (as a container does)")
    serve.add_argument(
        "service", nargs="?", choices=SERVICES, help="default: $KILN_SERVICE (what each image sets)"
    )
    serve.set_defaults(func=cmd_serve)
    health.add_command(commands)
    containers.add_command(commands)
    add_client_commands(commands)  # kiln image, speak, chat, ...: calls to a running Kiln over HTTP
    envoy = commands.add_parser(
        "envoy-config", help="write an Envoy config (front proxy + gRPC/JSON transcoder) for this mesh"
    )
    envoy.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the config and descriptors (.kiln/envoy; with --deploy: envoy)",
    )
    envoy.add_argument(
        "--deploy",
        action="store_true",
        help="the committed envoy/ of the deployment files (DNS names, default settings)",
    )
    envoy.add_argument("--public-port", type=int, default=8080, help="the front proxy's port")
    envoy.add_argument("--services-host", default="127.0.0.1", help="where the services listener binds")
    envoy.add_argument("--services-port", type=int, default=8081, help="gRPC and transcoded JSON")
    envoy.add_argument("--expose-billing", action="store_true", help="also route kiln.billing.v1")
    envoy.set_defaults(func=cmd_envoy_config)
    deploy = commands.add_parser(
        "deploy-files", help="regenerate envoy/, deploy/compose.yaml and deploy/k8s/base from the catalog"
    )
    deploy.add_argument("--root", type=Path, default=Path("."), help="the checkout to write into")
    deploy.set_defaults(func=cmd_deploy_files)
    token = commands.add_parser(
        "token", help="print the mesh credential of an identity (grpcurl, backends calling services)"
    )
    token.add_argument("identity", help="who calls: 1-32 of a-z, 0-9 and '-' (e.g. operator)")
    token.add_argument("--edge", action="store_true", help="allow the edge's own identity")
    token.set_defaults(func=cmd_token)
    admin = commands.add_parser("admin", help="accounts, API keys, credits, maintenance mode")
    add_admin_commands(admin.add_subparsers(dest="admin_command", required=True))
    admin.set_defaults(func=cmd_admin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_expected_notices()
    try:
        return int(args.func(args, settings))
    except PortTaken as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
