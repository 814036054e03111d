"""Shipped cluster files: they parse with the code that will read them and name the same things.

The image (deploy/Dockerfile) is the Ray version and the pins of pyproject.toml; every manifest
runs one of the tags the Dockerfile documents; RayJob, RayService and the cluster launcher give
every node the same S3 storage URI and the MLflow address that deploy/mlflow_k8s.yaml defines.
Where a real parser exists it is used: Ray's cluster-launcher schema, Ray Serve's config schema,
MLflow's `server` command line, robustseg's own CLI and config loader. No kubectl here.
"""
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple
from urllib.parse import urlparse

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NAMESPACE = "robustseg"
S3_SECRET = "robustseg-s3"
WORKDIR = "/home/ray/robustseg"


# -- sources of truth -----------------------------------------------------------------------
def _project() -> Dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins() -> Dict[str, Requirement]:
    reqs = [Requirement(r) for r in _project()["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _ray_pin() -> str:
    (spec,) = _pins()["ray"].specifier
    assert spec.operator == "==", "Ray must be pinned exactly: the image and the clusters use that version"
    return spec.version


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _documented_tags() -> List[str]:
    """The image tags of the build commands in the Dockerfile's header."""
    return re.findall(r"docker build .*?-t (\S+)", _dockerfile())


def _manifest(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def _mlflow_docs() -> List[Dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "mlflow_k8s.yaml").read_text()) if d]


def _obj(docs: List[Dict[str, Any]], kind: str, name: str) -> Dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"mlflow_k8s.yaml: expected one {kind} {name}, found {len(found)}"
    return found[0]


def _service_port(svc: Dict[str, Any]) -> int:
    (port,) = svc["spec"]["ports"]
    return int(port["port"])


def _mlflow_in_cluster_uri() -> str:
    """http://<Service>.<namespace>.svc:<port> of the MLflow Service."""
    svc = _obj(_mlflow_docs(), "Service", "mlflow")
    return f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{_service_port(svc)}"


def _mlflow_vpc_uri() -> str:
    """The address of the internal load balancer (its ExternalDNS name) for nodes outside Kubernetes."""
    svc = _obj(_mlflow_docs(), "Service", "mlflow-vpc")
    host = svc["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/hostname"]
    return f"http://{host}:{_service_port(svc)}"


def _pod_containers(obj: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(group, container) for the head and every worker group of a RayJob or RayService."""
    spec = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", c
    for group in spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            yield group["groupName"], c


def _env(container: Dict[str, Any]) -> Dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("image", "head_image", "worker_image") and isinstance(v, str):
                yield v
            else:
                yield from _images(v)
    elif isinstance(node, list):
        for v in node:
            yield from _images(v)


def _readme_cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## On a cluster\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, "README.md has no '## On a cluster' section"
    return m.group(1)


def _cli_commands(entrypoint: str) -> List[List[str]]:
    """Each `robustseg ...` command of a shell entrypoint, parsed by the real CLI parser."""
    from robustseg.cli import build_parser

    out = []
    for part in entrypoint.split("&&"):
        tokens = shlex.split(part)
        assert tokens[0] == "robustseg", f"entrypoint runs {tokens[0]!r}, not the robustseg CLI"
        build_parser().parse_args(tokens[1:])  # exits (fails the test) on an unknown option
        out.append(tokens[1:])
    return out


def _opt(tokens: List[str], flag: str) -> str:
    return tokens[tokens.index(flag) + 1]


# -- the image ------------------------------------------------------------------------------
def test_dockerfile_base_image_is_the_pinned_ray():
    ray = _ray_pin()
    text = _dockerfile()
    default = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, flags=re.M).group(1)
    assert default == f"rayproject/ray:{ray}-py311-cpu"
    gpu_bases = re.findall(r"--build-arg RAY_IMAGE=(\S+)", text)
    assert gpu_bases and all(b.startswith(f"rayproject/ray:{ray}-py311-") for b in gpu_bases)
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, flags=re.M)
    # The last stage is what a plain `docker build` makes: the Ray node image.
    assert froms[-1] == ("${RAY_IMAGE}", "robustseg")
    # py311 must satisfy requires-python.
    from packaging.specifiers import SpecifierSet

    assert "3.11" in SpecifierSet(_project()["requires-python"])


def test_dockerfile_installs_the_package_with_pyproject_pins():
    text = _dockerfile()
    node_stage = text.split("AS robustseg", 1)[1]
    assert re.search(r"^WORKDIR /home/ray/robustseg$", node_stage, flags=re.M)
    assert re.search(r"^RUN pip install --no-cache-dir \. ", node_stage, flags=re.M), \
        "the node image must `pip install .` so that every pin comes from pyproject.toml"
    assert "USER root" not in node_stage, "the image keeps the Ray image's non-root user"
    assert "COPY --chown=ray:users" in node_stage
    pins = _pins()
    listed = [Requirement(r) for r in re.findall(r'"([A-Za-z0-9_.\-\[\]]+[<>=!~][^"]*)"', text)]
    listed += [Requirement(r) for r in re.findall(r"\b(torch==[0-9][0-9A-Za-z.+]*)", text)]
    assert {canonicalize_name(r.name) for r in listed} >= {"mlflow", "torch"}
    for req in listed:
        name = canonicalize_name(req.name)
        if name == "torch":
            # pyproject leaves torch open to a build; the image takes the Makefile's CPU version.
            makefile = re.search(r"torch==([0-9][0-9A-Za-z.+]*)", (REPO / "Makefile").read_text()).group(1)
            assert str(req.specifier) == f"=={makefile}"
            assert pins["torch"].specifier.contains(makefile)
        elif name in pins:
            assert req.specifier == pins[name].specifier, f"{req.name}: Dockerfile {req.specifier}, pyproject {pins[name].specifier}"


def test_image_tags_follow_the_project_version():
    version = _project()["version"]
    tags = _documented_tags()
    assert sorted(tags) == sorted([f"ghcr.io/robustseg/robustseg:{version}", f"ghcr.io/robustseg/robustseg:{version}-gpu",
                                   f"ghcr.io/robustseg/robustseg-mlflow:{version}"])
    used = set()
    for name in ("kuberay_rayjob.yaml", "kuberay_rayservice.yaml", "cluster.yaml"):
        images = set(_images(_manifest(name)))
        assert images and images <= set(tags), f"{name} runs {images - set(tags)}, not an image of deploy/Dockerfile"
        used |= images
    mlflow_images = {i for i in _images(_mlflow_docs()) if not i.startswith("postgres:")}
    assert mlflow_images == {f"ghcr.io/robustseg/robustseg-mlflow:{version}"}
    assert used | mlflow_images == set(tags), "a documented image that nothing runs"
    readme = _readme_cluster_section()
    for tag in tags:
        assert f"-t {tag} " in readme and f"docker push {tag}" in readme, f"README does not build and push {tag}"


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "robustseg_work", "mlruns"} <= ignored
    # What `pip install .` needs must stay in the context.
    assert not ignored & {"README.md", "pyproject.toml", "platform", "trainables", "search_spaces", "deploy", "configs"}


# -- Ray cluster launcher -------------------------------------------------------------------
def test_cluster_launcher_yaml():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _manifest("cluster.yaml")
    validate_config(prepare_config(raw))  # Ray's own schema (raises on an unknown key)
    c = raw
    assert c["head_node_type"] in c["available_node_types"]
    gpu = c["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["max_workers"] >= 1
    # Code and dependencies come from the image, not from the nodes' setup.
    assert not any("pip install" in cmd for cmd in c.get("setup_commands", []))
    env = dict(opt.split(" ", 1)[1].split("=", 1) for opt in c["docker"]["run_options"] if opt.startswith("--env "))
    assert urlparse(env["ROBUSTSEG_STORAGE_URI"]).scheme == "s3" and urlparse(env["ROBUSTSEG_STORAGE_URI"]).netloc
    assert env["MLFLOW_TRACKING_URI"] == _mlflow_vpc_uri()
    assert env["AWS_REGION"] == c["provider"]["region"]


# -- KubeRay --------------------------------------------------------------------------------
def _check_ray_pods(obj: Dict[str, Any], storage: str) -> None:
    assert obj["apiVersion"] == "ray.io/v1" and obj["metadata"]["namespace"] == NAMESPACE
    spec = obj["spec"].get("rayClusterSpec") or obj["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == _ray_pin()
    groups = list(_pod_containers(obj))
    assert len(groups) >= 2
    for group, c in groups:
        env = _env(c)
        assert env.get("ROBUSTSEG_STORAGE_URI") == storage, f"{group}: ROBUSTSEG_STORAGE_URI"
        assert env.get("MLFLOW_TRACKING_URI") == _mlflow_in_cluster_uri(), f"{group}: MLFLOW_TRACKING_URI"
        assert {"secretRef": {"name": S3_SECRET}} in c.get("envFrom", []), f"{group}: S3 credentials"


def _storage() -> str:
    env = _env(next(_pod_containers(_manifest("kuberay_rayjob.yaml")))[1])
    uri = env["ROBUSTSEG_STORAGE_URI"]
    assert urlparse(uri).scheme == "s3" and urlparse(uri).netloc, uri
    return uri


def test_kuberay_rayjob():
    j = _manifest("kuberay_rayjob.yaml")
    assert j["kind"] == "RayJob" and j["spec"]["shutdownAfterJobFinishes"] is True
    _check_ray_pods(j, _storage())
    workers = j["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert j["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True and workers[0]["maxReplicas"] >= 1

    tune, ensemble = _cli_commands(j["spec"]["entrypoint"])
    assert tune[0] == "tune" and ensemble[0] == "ensemble"
    assert _opt(ensemble, "--sweep") == _opt(tune, "--name"), "the ensemble must take the sweep just run"
    config = _opt(tune, "--config")
    assert config == _opt(ensemble, "--config") and config.startswith(WORKDIR + "/")
    from robustseg.config import ExperimentConfig
    from robustseg.registry import SEARCH_SPACES

    import search_spaces  # noqa: F401  (registers the spaces)

    overrides = [t for t in tune[1:] if "=" in t and not t.startswith("-")]
    cfg = ExperimentConfig.from_yaml(REPO / Path(config).relative_to(WORKDIR), overrides)
    assert urlparse(cfg.data.shards_uri).scheme == "s3" and cfg.scaling.use_gpu is True
    assert _opt(tune, "--space") in SEARCH_SPACES


def test_kuberay_rayservice():
    from ray.serve.schema import ServeDeploySchema

    from robustseg.serving import settings_from

    s = _manifest("kuberay_rayservice.yaml")
    assert s["kind"] == "RayService"
    _check_ray_pods(s, _storage())
    serve = ServeDeploySchema.model_validate(yaml.safe_load(s["spec"]["serveConfigV2"]))
    assert serve.http_options.host == "0.0.0.0"  # the Service KubeRay creates must reach the proxies
    (app,) = serve.applications
    local = _manifest("serve_config.yaml")["applications"][0]
    assert app.import_path == local["import_path"] == "deploy.serve_app:build_app"
    settings = settings_from(app.args, environ={})  # raises on an unknown setting
    assert set(app.args) <= set(local["args"])
    (dep,) = app.deployments
    assert dep.name == local["deployments"][0]["name"] and dep.num_replicas == 2
    # The model is what the RayJob registers.
    _, ensemble = _cli_commands(_manifest("kuberay_rayjob.yaml")["spec"]["entrypoint"])
    assert settings.model_uri == f"models:/{_opt(ensemble, '--name')}@{_opt(ensemble, '--alias')}"
    # Both replicas fit on the worker pods.
    (group,) = s["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod_cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    per_replica = dep.ray_actor_options.num_cpus
    assert group["replicas"] * (pod_cpus // per_replica) >= dep.num_replicas


# -- MLflow ---------------------------------------------------------------------------------
def test_mlflow_manifest():
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    docs = _mlflow_docs()
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs)
    dep = _obj(docs, "Deployment", "mlflow")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    params = server.make_context("server", list(c["args"])).params  # MLflow's own option parser
    assert params["host"] == "0.0.0.0" and params["serve_artifacts"] is True
    assert urlparse(params["artifacts_destination"]).scheme == "s3"
    (port,) = c["ports"]
    assert params["port"] == port["containerPort"]
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] in (port["name"], port["containerPort"])
    # The Services route to the pods.
    for name in ("mlflow", "mlflow-vpc"):
        svc = _obj(docs, "Service", name)
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert svc["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    # Clients' Host headers pass MLflow's DNS-rebinding check (else every request gets a 403).
    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    for uri in (_mlflow_in_cluster_uri(), _mlflow_vpc_uri()):
        assert is_allowed_host_header(allowed, urlparse(uri).netloc), uri
    # Backend: the Postgres Service, password from its Secret; S3 credentials from the shared Secret.
    env = {e["name"]: e for e in c["env"]}
    backend = urlparse(env["MLFLOW_BACKEND_STORE_URI"]["value"])
    pg = _obj(docs, "Service", "mlflow-postgres")
    assert backend.scheme == "postgresql" and (backend.hostname, backend.port) == ("mlflow-postgres", _service_port(pg))
    assert backend.password == "$(POSTGRES_PASSWORD)" and "POSTGRES_PASSWORD" in env
    assert {"secretRef": {"name": S3_SECRET}} in c["envFrom"]
    pg_dep = _obj(docs, "Deployment", "mlflow-postgres")
    assert pg["spec"]["selector"].items() <= pg_dep["spec"]["template"]["metadata"]["labels"].items()
    claim = pg_dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    _obj(docs, "PersistentVolumeClaim", claim)


# -- README and the plain `ray job submit` files --------------------------------------------
def test_readme_cluster_section_names_the_commands():
    readme = _readme_cluster_section()
    for manifest in ("mlflow_k8s.yaml", "kuberay_rayjob.yaml", "kuberay_rayservice.yaml"):
        assert f"kubectl apply -f deploy/{manifest}" in readme
    assert f"kubectl create namespace {NAMESPACE}" in readme
    for secret in (S3_SECRET, "robustseg-mlflow-db"):
        assert f"-n {NAMESPACE} create secret generic {secret}" in readme
    assert "ray up deploy/cluster.yaml" in readme and "ray job submit" in readme
    assert "### A local 3-node cluster (network namespaces)" in readme


def test_runtime_env_excludes_local_state():
    env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"] and "robustseg_work/" in env["excludes"]


def test_job_entry_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "deploy.job_entry", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert "--space" in out and "ray job submit" in out
