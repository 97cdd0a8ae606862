"""deploy/: the compose file against the Compose Specification, the Kubernetes manifests against the
Kubernetes API schemas (strict: unknown fields fail), the operator's DaskCluster against the operator's
own CRD, and the Dockerfile against the repository it builds.

Offline by construction: the schemas come vendored in the dev extra's packages (check-jsonschema's
copy of compose-spec.json, kubernetes-validate's API schemas, dask-kubernetes' CRDs), nothing is
downloaded. No container engine or cluster runs here: these are the checks that can be made without one.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes still supported upstream when this was written
LOOPBACK_PUBLISH = re.compile(r"^\$\{EQUISLIDE_PUBLISH_HOST:-127\.0\.0\.1\}:\d+:\d+$")


# --- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (dev extra) carries the compose schema")
    text = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(text.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _compose_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_follows_the_compose_specification(compose, compose_schema):
    assert _compose_errors(compose, compose_schema) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["services"]["dask-cuda-worker"]["deploy"]["resources"]["reservations"].update(gpus=1),
        lambda d: d["services"]["prefect-server"].update(port=["4200:4200"]),
        lambda d: d["services"]["postgres"]["healthcheck"].update(interval=10),
    ],
    ids=["unknown-reservation", "misspelt-key", "interval-not-a-duration"],
)
def test_compose_validator_rejects_a_damaged_file(compose, compose_schema, damage):
    """The check can fail: the same file with one plausible mistake is rejected."""
    damaged = copy.deepcopy(compose)
    damage(damaged)
    assert _compose_errors(damaged, compose_schema)


def test_compose_stack_is_secure_by_default(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "dask-scheduler", "dask-cuda-worker", "prefect-worker"} <= set(
        services
    )
    for name, service in services.items():
        for port in service.get("ports", []):
            assert LOOPBACK_PUBLISH.match(port), f"{name} publishes {port} beyond the host's loopback"
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    # ${VAR:?...}: compose refuses to start the stack without an auth string.
    assert server["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    gpu = services["dask-cuda-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name in ("dask-scheduler", "dask-cuda-worker", "prefect-worker"):
        env = services[name]["environment"]
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "true", name
        assert {s["source"] for s in services[name]["secrets"]} == {"dask_ca", "dask_cert", "dask_key"}
        assert "tcp://" not in " ".join(services[name].get("command", [])), name
    assert services["prefect-worker"]["environment"]["EQUISLIDE_SCHEDULER"].startswith("tls://")
    for name in ("dask-cuda-worker", "prefect-worker"):
        mounts = services[name]["volumes"]
        assert "slides:/data/inbox:ro" in mounts and "runs:/data/runs" in mounts, name
    assert compose["networks"]["backend"]["internal"] is True
    assert services["postgres"]["networks"] == ["backend"]
    for name, secret in compose["secrets"].items():
        assert (DEPLOY / secret["file"]).parent.name == "secrets", name


# --- Kubernetes -------------------------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [
            (f"{path.name}:{d['kind']}/{d['metadata']['name']}", d)
            for d in yaml.safe_load_all(path.read_text())
            if d
        ]
    return docs


def _crd_schema(kind: str) -> dict[str, Any]:
    spec = importlib.util.find_spec("dask_kubernetes")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("dask-kubernetes (dev extra) carries the operator's CRDs")
    crds = Path(spec.submodule_search_locations[0]) / "operator/deployment/helm/dask-kubernetes-operator/crds"
    crd = yaml.safe_load((crds / f"{kind.lower()}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently prune: keys the structural schema does not declare."""
    if isinstance(doc, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        found = []
        for key, value in doc.items():
            if key in props:
                found += _unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += _unknown_fields(value, extra, f"{path}.{key}")
            elif not extra:
                found.append(f"{path}.{key}")
        return found
    if isinstance(doc, list) and "items" in schema:
        return [
            f for i, item in enumerate(doc) for f in _unknown_fields(item, schema["items"], f"{path}[{i}]")
        ]
    return []


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


MANIFESTS = _manifests()


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[n for n, _ in MANIFESTS])
def test_manifest_is_valid(doc):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
    import jsonschema

    if doc["apiVersion"].startswith("kubernetes.dask.org/"):
        schema = _crd_schema(doc["kind"])
        jsonschema.Draft7Validator(schema).validate(doc)
        # apiVersion, kind and metadata are the API server's own; the CRD describes spec (and status).
        assert _unknown_fields(doc["spec"], schema["properties"]["spec"], ".spec") == []
        # The pod templates inside, held to the Kubernetes PodSpec itself (strict).
        for group in ("worker", "scheduler"):
            if group in doc["spec"]:
                kv.validate(_pod(doc["spec"][group]["spec"]), K8S_VERSION, strict=True)
    else:
        kv.validate(doc, K8S_VERSION, strict=True)


def test_manifest_validators_reject_a_damaged_manifest():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")
    import jsonschema

    docs = dict(MANIFESTS)
    server = copy.deepcopy(docs["prefect-server.yaml:Deployment/prefect-server"])
    server["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "4200"
    with pytest.raises(kv.ValidationError):
        kv.validate(server, K8S_VERSION, strict=True)
    cluster = copy.deepcopy(docs["dask-cluster.yaml:DaskCluster/equislide"])
    cluster["spec"]["worker"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_crd_schema("DaskCluster")).validate(cluster)
    cluster = copy.deepcopy(docs["dask-cluster.yaml:DaskCluster/equislide"])
    cluster["spec"]["worker"]["replica"] = 2
    spec_schema = _crd_schema("DaskCluster")["properties"]["spec"]
    assert _unknown_fields(cluster["spec"], spec_schema, ".spec") == [".spec.worker.replica"]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "DaskCluster":
        return [c for g in ("worker", "scheduler") for c in doc["spec"][g]["spec"]["containers"]]
    if doc["kind"] == "DaskWorkerGroup":
        return doc["spec"]["worker"]["spec"]["containers"]
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return doc["spec"]["template"]["spec"]["containers"]
    return []


def test_kubernetes_stack_is_secure_by_default():
    docs = dict(MANIFESTS)
    kinds = {n.split(":", 1)[1] for n in docs}
    assert {
        "Deployment/prefect-server", "Service/prefect-server", "Deployment/prefect-worker",
        "DaskCluster/equislide", "PersistentVolumeClaim/equislide-slides",
        "PersistentVolumeClaim/equislide-runs",
    } <= kinds  # fmt: skip
    cluster = docs["dask-cluster.yaml:DaskCluster/equislide"]
    gpu = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "GPU=1" in gpu["args"] and "equislide.flows._preload" in gpu["args"]
    for name, doc in docs.items():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", (
                f"{name} is exposed outside the cluster"
            )
        for c in _containers(doc):
            command = " ".join(c.get("command", []) + c.get("args", []))
            assert "tcp://" not in command, f"{name}: {command}"
            if "dask" in command.split()[:1]:
                assert "tls://" in command or "--protocol tls" in command, f"{name}: {command}"
                assert "--tls-cert" in command, f"{name}: {command}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            env = {e["name"]: e for e in c.get("env", [])}
            for secret in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "POSTGRES_PASSWORD"):
                if secret in env:
                    assert "valueFrom" in env[secret], f"{name}: {secret} written into the manifest"
    server_env = {
        e["name"] for e in _containers(docs["prefect-server.yaml:Deployment/prefect-server"])[0]["env"]
    }
    assert {"PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_DATABASE_CONNECTION_URL"} <= server_env


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


# --- the image --------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    # As Docker reads it: comment lines go first (also inside a continued instruction), then continuations.
    lines = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if not ln.strip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip())
        for ln in joined.splitlines()
        if ln.strip()
    ]


def test_dockerfile_builds_what_the_repository_holds():
    import tomllib

    steps = _instructions()
    args = {k: v.strip('"') for k, _, v in (a.partition("=") for op, a in steps if op == "ARG")}
    base = [a for op, a in steps if op == "FROM"]
    assert base == ["${CUDA_IMAGE}"] and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "runtime" in args["CUDA_IMAGE"]
    copied = {shlex.split(a)[0] for op, a in steps if op == "COPY"}
    for src in copied:
        assert (REPO / src).exists(), f"the Dockerfile copies {src}, which the repository does not hold"
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in {d.split("/")[0] for d in package_dirs.values()}:
        assert folder in copied, f"the image misses the package folder {folder}/"
    run = " ".join(a for op, a in steps if op == "RUN")
    assert '".[gpu]"' in run and "DASK_CUDA_SPEC" in run
    (user,) = [a for op, a in steps if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert any(op == "HEALTHCHECK" for op, _ in steps)
