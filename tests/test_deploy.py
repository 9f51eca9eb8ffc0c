"""The Docker image and the Kubernetes manifests, checked offline: hadolint, the kustomizations built with
kubectl, every object validated against the Kubernetes schemas, and the settings they carry checked against
the app's own."""

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.bots import load_bots
from config.settings import PROJECT_ROOT, VARIABLES, load_settings
from services.files.links import FILE_PATH
from services.redis_url import CLUSTER, SENTINEL, parse_redis_url

K8S = PROJECT_ROOT / "k8s"
KUSTOMIZATIONS = [
    "base",
    "jobs/db-init",
    "overlays/test-cluster",
    "overlays/redis-sentinel",
    "overlays/redis-cluster",
    "overlays/two-bots",
]
KUBERNETES_VERSIONS = ["1.30.0", "1.32.0"]
SETTING_NAMES = {setting.variable for setting in VARIABLES.values() if setting.variable}
GUNICORN_NAMES = {
    "GUNICORN_WORKERS",
    "GUNICORN_THREADS",
    "GUNICORN_TIMEOUT",
    "GUNICORN_GRACEFUL_TIMEOUT",
    "PORT",
    "BIND_HOST",
}
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool's path; skipped locally when missing, a failure in CI (.ci/run sets REQUIRE_DEPLOY_TOOLS=1)."""
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        if os.environ.get("REQUIRE_DEPLOY_TOOLS"):
            pytest.fail(f"{name} is required to check the deployment files")
        pytest.skip(f"{name} is not installed")
    return path


def build(kustomization: str) -> list[dict]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kustomizations_build_and_validate_against_the_schemas(kustomization, version, tmp_path):
    objects = build(kustomization)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [tool("kubernetes-validate"), "-k", version, "--strict", "--quiet", str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


SECRET_EXAMPLES = ["base", "overlays/redis-sentinel", "overlays/redis-cluster", "overlays/two-bots"]


@pytest.mark.parametrize("folder", SECRET_EXAMPLES)
def test_the_secret_examples_validate_and_stay_out_of_the_kustomizations(folder):
    result = subprocess.run(
        [tool("kubernetes-validate"), "-k", "1.32.0", "--strict", "--quiet", str(K8S / folder / "secret.example.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(o["kind"] != "Secret" for o in build(folder))


@pytest.mark.parametrize(
    ("folder", "kind"), [("overlays/redis-sentinel", SENTINEL), ("overlays/redis-cluster", CLUSTER)]
)
def test_the_topology_overlays_name_their_redis_in_a_url_the_app_takes(folder, kind):
    example = yaml.safe_load((K8S / folder / "secret.example.yaml").read_text())["stringData"]
    assert set(example) <= SETTING_NAMES
    assert parse_redis_url(example["REDIS_URL"]).kind == kind
    config = find(build(folder), "ConfigMap", "wecom-gateway")["data"]
    assert int(config["REDIS_CLAIM_WAIT_MS"]) > 0


def test_the_deployment_fits_the_app():
    objects = build("base")
    deployment = find(objects, "Deployment", "wecom-gateway")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["memory"]
    assert container["resources"]["requests"]["cpu"]
    config = find(objects, "ConfigMap", "wecom-gateway")["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    graceful = int(config["GUNICORN_GRACEFUL_TIMEOUT"])
    # the pod must outlive the preStop sleep plus gunicorn's drain, or Kubernetes kills answers mid-drain
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + graceful + 5
    service = find(objects, "Service", "wecom-gateway")
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    pdb = find(objects, "PodDisruptionBudget", "wecom-gateway")
    assert pdb["spec"]["minAvailable"] < spec["replicas"]
    assert find(objects, "HorizontalPodAutoscaler", "wecom-gateway")["spec"]["minReplicas"] == spec["replicas"]


def test_only_the_callback_path_and_the_file_links_are_exposed_outside_the_cluster():
    objects = build("base")
    config = find(objects, "ConfigMap", "wecom-gateway")["data"]
    ingress = find(objects, "Ingress", "wecom-gateway")
    paths = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    expected = [(config["WECOM_CALLBACK_PATH"], "Exact"), (FILE_PATH, "Prefix")]
    assert [(p["path"], p["pathType"]) for p in paths] == expected
    for path in paths:
        assert path["backend"]["service"] == {"name": "wecom-gateway", "port": {"name": "http"}}
    host = ingress["spec"]["rules"][0]["host"]
    assert config["PUBLIC_BASE_URL"] == f"https://{host}"  # the links point at the Ingress


def test_metrics_are_served_on_a_pod_port_the_service_does_not_expose():
    objects = build("base")
    config = find(objects, "ConfigMap", "wecom-gateway")["data"]
    [container] = find(objects, "Deployment", "wecom-gateway")["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == int(config["METRICS_PORT"])
    service = find(objects, "Service", "wecom-gateway")
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]


def test_config_and_secret_keys_are_settings_the_app_reads():
    objects = build("overlays/test-cluster")
    config = find(objects, "ConfigMap", "wecom-gateway")["data"]
    secret_keys = set(find(objects, "Secret", "wecom-gateway")["data"])
    example_keys = set(yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())["stringData"])
    assert set(config) <= SETTING_NAMES | GUNICORN_NAMES
    assert example_keys <= SETTING_NAMES
    assert secret_keys == example_keys
    assert not set(config) & example_keys  # no secret sits in the ConfigMap


def test_the_test_cluster_overlay_brings_its_own_redis_mariadb_and_standins():
    objects = build("overlays/test-cluster")
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    assert deployments == {"wecom-gateway", "redis", "mariadb", "standins"}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"wecom-gateway-test"}
    config = find(objects, "ConfigMap", "wecom-gateway")["data"]
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    for url in (config["DIFY_BASE_URL"], config["AUTH_API_URL"]):
        assert re.match(r"http://([a-z-]+):\d+/", url).group(1) in services


def test_the_dockerfile_lints_clean():
    result = subprocess.run(
        [tool("hadolint"), str(PROJECT_ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_unprivileged_without_demo_files():
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    gateway_stage = dockerfile.split("AS gateway", 1)[1].split("AS standins", 1)[0]
    assert re.search(r"^USER 10001", gateway_stage, re.M)
    assert "DEMO_MODE=false" in gateway_stage
    assert "COPY demo" not in gateway_stage
    assert re.search(r"^FROM gateway\s*$", dockerfile.strip().splitlines()[-1])  # the default target
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {"demo.env", ".env", ".git", "tests/", ".venv"} <= set(ignored)


def _image_files() -> list[Path]:
    """The Python files the gateway image ships: what the gateway stage COPYs from the build context."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    gateway_stage = dockerfile.split("AS gateway", 1)[1].split("AS standins", 1)[0]
    files: list[Path] = []
    for line in gateway_stage.splitlines():
        words = line.split()
        if words[:1] != ["COPY"] or any(word.startswith("--from") for word in words):
            continue
        for source in words[1:-1]:
            path = PROJECT_ROOT / source
            files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.suffix == ".py" else []
    return files


def _requirements(path: Path) -> set[str]:
    """Package names a requirements file installs, following its `-r` includes."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            names |= _requirements(path.parent / line[2:].strip())
        elif line:
            names.add(re.split(r"[=<>~!\[ ]", line, maxsplit=1)[0].lower())
    return names


def test_the_image_installs_no_demo_extras():
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    installed = re.findall(r"pip install [^\n]*-r (\S+)", dockerfile)
    copied = dict(re.findall(r"^COPY (requirements[\w-]*\.txt) (\S+)$", dockerfile, re.M))
    assert installed == ["/tmp/requirements.txt"]
    assert copied == {"requirements.txt": "/tmp/requirements.txt"}
    packages = _requirements(PROJECT_ROOT / "requirements.txt")
    assert {"flask", "gunicorn", "redis"} <= packages
    assert not packages & {"fakeredis", "lupa"}
    assert {"fakeredis", "lupa"} <= _requirements(PROJECT_ROOT / "requirements-demo.txt")


def test_no_module_of_the_image_imports_the_demo():
    files = _image_files()
    assert PROJECT_ROOT / "app.py" in files
    assert PROJECT_ROOT / "services" / "gateway.py" in files
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name == "demo" or name.startswith("demo.") for name in names):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_module_of_the_services_answers_http_requests():
    """Routes live in app.py and web/: they parse a request, call the services and render. No module of services/
    imports Flask or werkzeug, so the work can run, and be tested, without a request."""
    offenders = []
    for path in sorted((PROJECT_ROOT / "services").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name.split(".")[0] in ("flask", "werkzeug") for name in names):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_module_of_the_services_or_the_settings_imports_one_that_imports_it_back():
    """No import cycle in production code, annotations included (the runner once set a lease clock on the job,
    whose type the job imported back from the runner). `cli/` is left out: its package registers its commands'
    modules, which take their helpers from it."""
    import grimp

    graph = grimp.build_graph("web", "services", "config", "utils", exclude_type_checking_imports=False)
    cycles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.find_shortest_chain(importer=imported, imported=module)
        }
    )
    assert cycles == []


def test_the_streams_code_never_asks_which_wecom_mode_it_runs_in():
    """The mode is the bot's Delivery, chosen where the bot is built (services/streams/delivery.py): an answer's life
    names neither the mode nor a long connection's parts, so a change to one mode's way is made in one place."""
    mode_names = {"wecom_mode", "long_connection", "send_separately", "outbox", "ws_req_id", "ws_generation"}
    offenders = []
    for path in sorted((PROJECT_ROOT / "services" / "streams").glob("*.py")):
        if path.name == "delivery.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = getattr(node, "attr", None) or getattr(node, "id", None) or getattr(node, "arg", None)
            if name in mode_names:
                offenders.append(f"{path.name}:{node.lineno} {name}")
    assert offenders == []


def test_the_two_bots_overlay_mounts_every_secret_its_bots_file_reads(tmp_path):
    """Each `*_file` of the bots file is a key of a bot's Secret mounted at that folder; the Ingress exposes each
    bot's path and no other; and with the Secrets' files in place the file loads (config/bots.py)."""
    objects = build("overlays/two-bots")
    config = find(objects, "ConfigMap", "wecom-gateway")["data"]
    bots_map = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("wecom-gateway-bots")
    )
    pod = find(objects, "Deployment", "wecom-gateway")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[str(Path(config["BOTS_FILE"]).parent)]["configMap"]["name"] == bots_map["metadata"]["name"]

    examples = {
        s["metadata"]["name"]: s["stringData"]
        for s in yaml.safe_load_all((K8S / "overlays/two-bots/secret.example.yaml").read_text())
    }
    text = bots_map["data"]["bots.toml"]
    for path in re.findall(r'_file = "([^"]+)"', text):
        secret = mounts[str(Path(path).parent)]["secret"]["secretName"]
        assert Path(path).name in examples[secret]
        local = tmp_path / Path(path).relative_to("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        own = hashlib.sha256(path.encode()).hexdigest()  # each bot's secrets its own, as the bots file requires
        local.write_text(own[:43] if local.name == "encoding-aes-key" else f"secret-{own[:8]}")
    assert set(examples["wecom-gateway"]) <= SETTING_NAMES
    assert "WECOM_TOKEN" not in examples["wecom-gateway"]

    bots_file = tmp_path / "bots.toml"
    bots_file.write_text(text.replace('"/run/', f'"{tmp_path}/run/'))
    env = {
        **{k: v for k, v in config.items() if k in SETTING_NAMES},
        **examples["wecom-gateway"],
        "BOTS_FILE": str(bots_file),
    }
    bots = load_bots(load_settings(env, env_files=()))
    ingress = find(objects, "Ingress", "wecom-gateway")
    paths = [(p["path"], p["pathType"]) for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == [(bot.wecom.callback_path, "Exact") for bot in bots] + [(FILE_PATH, "Prefix")]


WALKTHROUGH = PROJECT_ROOT / "docs" / "deployment.md"


def walkthrough_steps() -> list[tuple[str, list[str]]]:
    """The `kubectl create secret` and `kubectl apply -k` commands of docs/deployment.md's first walkthrough (up to
    its Upgrades section), in order: (command, its words)."""
    text = WALKTHROUGH.read_text().split("## Upgrades")[0]
    steps = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if words[:3] == ["kubectl", "create", "secret"] or words[:3] == ["kubectl", "apply", "-k"]:
                steps.append((line.strip(), words))
    return steps


def needs(obj: dict) -> set[tuple[str, str]]:
    """The ConfigMaps and Secrets an object needs to exist (optional references left out)."""
    found: set[tuple[str, str]] = set()
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for source in container.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                ref = source.get(key)
                if ref and not ref.get("optional"):
                    found.add((kind, ref["name"]))
        for env in container.get("env", []):
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = env.get("valueFrom", {}).get(key)
                if ref and not ref.get("optional"):
                    found.add((kind, ref["name"]))
    for volume in pod.get("volumes", []):
        if volume.get("configMap") and not volume["configMap"].get("optional"):
            found.add(("ConfigMap", volume["configMap"]["name"]))
        if volume.get("secret") and not volume["secret"].get("optional"):
            found.add(("Secret", volume["secret"]["secretName"]))
    for tls in obj.get("spec", {}).get("tls", []) if obj.get("kind") == "Ingress" else []:
        found.add(("Secret", tls["secretName"]))
    return found


def test_the_walkthrough_creates_what_each_object_needs_before_it():
    """docs/deployment.md, applied in its order: every ConfigMap and Secret an object needs was created by an
    earlier step (or by the same `kubectl apply -k`, which creates ConfigMaps before the objects using them)."""
    steps = walkthrough_steps()
    assert [words[:3] for _, words in steps][:3] == [["kubectl", "create", "secret"]] * 2 + [["kubectl", "apply", "-k"]]
    created: set[tuple[str, str]] = set()
    applied = []
    for line, words in steps:
        if words[2] == "secret":
            created.add(("Secret", words[4]))
            continue
        path = words[3]
        assert path.startswith("k8s/"), line
        objects = build(path.removeprefix("k8s/"))
        ours = {(o["kind"], o["metadata"]["name"]) for o in objects}
        for obj in objects:
            missing = needs(obj) - created - ours
            assert not missing, f"{line}: {obj['kind']} {obj['metadata']['name']} needs {missing}, created later"
        created |= ours
        applied.append(path)
    assert applied == ["k8s/base", "k8s/jobs/db-init"]


def test_the_image_tag_is_set_in_one_place():
    tags = {
        container["image"]
        for path in ("base", "jobs/db-init")
        for obj in build(path)
        for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    }
    assert tags == {"registry.example.com/wecom-gateway:0.1.0"}
    mentions = [p for p in K8S.rglob("kustomization.yaml") if "registry.example.com/wecom-gateway\n" in p.read_text()]
    assert [str(p.relative_to(K8S)) for p in mentions] == ["components/image/kustomization.yaml"]
