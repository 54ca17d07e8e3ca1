"""deploy/: the offline checks (deploy/check.py) pass on the committed files and fail, naming the
file and field, on broken copies; the image's repository step and Redis's start script work."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _load_check():
    spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load_check()


def failures(root: Path, *groups: str) -> str:
    return "\n".join(f"{r.name}: {r.message}" for r in check.run(root, groups or check.GROUPS).failures)


@pytest.fixture
def deploy_copy(tmp_path) -> Path:
    target = tmp_path / "deploy"
    shutil.copytree(DEPLOY, target, ignore=shutil.ignore_patterns("__pycache__", ".env"))
    return target


def edit_yaml(path: Path, change) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    change(docs)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def triton_container(docs):
    return docs[0]["spec"]["template"]["spec"]["containers"][0]


# -- the committed files ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_check_cli_passes_on_deploy():
    proc = subprocess.run([sys.executable, str(DEPLOY / "check.py")], capture_output=True, text=True, timeout=110)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-1].startswith("deploy-check: ") and ", 0 failed" in lines[-1]
    assert all(line.split()[0] in ("ok", "skip") for line in lines[:-1]), proc.stdout


@pytest.mark.timeout(120)
def test_every_manifest_validates_against_kubernetes_strict():
    result = check.run(DEPLOY, ["kubernetes"])
    assert not result.failures, failures(DEPLOY, "kubernetes")
    validated = {r.name.split(":")[0] for r in result.results if r.status == "ok"}
    manifests = {f"kubernetes/{p.name}" for p in (DEPLOY / "kubernetes").glob("*.yaml")}
    assert manifests <= validated | {"kubernetes/kustomization.yaml"}
    kinds = {r.name.split(": ")[1].split("/")[0] for r in result.results if r.name.count(":") == 1}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet",
            "ConfigMap", "Secret"} <= kinds


@pytest.mark.timeout(120)
def test_dockerfile_is_hadolint_clean():
    result = check.run(DEPLOY, ["dockerfile"])
    assert not result.failures, failures(DEPLOY, "dockerfile")
    assert [r.status for r in result.results if r.name == "Dockerfile: hadolint"] == ["ok"]


@pytest.mark.timeout(120)
def test_compose_validates_against_the_compose_spec():
    assert not failures(DEPLOY, "compose")


@pytest.mark.timeout(120)
def test_kustomize_build_validates_when_kubectl_is_installed():
    result = check.run(DEPLOY, ["kustomize"])
    assert not result.failures, failures(DEPLOY, "kustomize")
    assert [r.status for r in result.results] == ["ok" if shutil.which("kubectl") or shutil.which("kustomize")
                                                  else "skip"]


@pytest.mark.timeout(120)
def test_cross_checks_pass():
    assert not failures(DEPLOY, "cross")


# -- broken copies fail, naming the file and the field ---------------------------------------------
@pytest.mark.timeout(120)
def test_unknown_field_in_deployment_fails(deploy_copy):
    path = deploy_copy / "kubernetes" / "triton-deployment.yaml"
    edit_yaml(path, lambda docs: triton_container(docs).update(imagePullPolicyy="Always"))
    text = failures(deploy_copy, "kubernetes")
    assert "kubernetes/triton-deployment.yaml: Deployment/nirvana-triton" in text
    assert "spec.template.spec.containers.0" in text and "'imagePullPolicyy' was unexpected" in text


@pytest.mark.timeout(120)
def test_service_target_port_mismatch_fails(deploy_copy):
    path = deploy_copy / "kubernetes" / "triton-service.yaml"
    edit_yaml(path, lambda docs: docs[0]["spec"]["ports"][0].update(targetPort=8080))
    text = failures(deploy_copy, "cross")
    assert "kubernetes/triton-service.yaml: Service/nirvana-triton" in text
    assert "spec.ports[name=http].targetPort 8080 matches no container port" in text


@pytest.mark.timeout(120)
def test_readiness_path_must_be_ready_endpoint(deploy_copy):
    path = deploy_copy / "kubernetes" / "triton-deployment.yaml"
    edit_yaml(path, lambda docs: triton_container(docs)["readinessProbe"]["httpGet"].update(path="/v2/health/live"))
    assert "readinessProbe.httpGet.path is '/v2/health/live', must be '/v2/health/ready'" in failures(
        deploy_copy, "cross")


@pytest.mark.timeout(120)
def test_manifest_missing_from_kustomization_fails(deploy_copy):
    (deploy_copy / "kubernetes" / "extra-configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n")
    assert "kubernetes/kustomization.yaml: resources does not list ['extra-configmap.yaml']" in failures(
        deploy_copy, "kubernetes")


@pytest.mark.timeout(120)
def test_redis_must_not_evict_on_its_own(deploy_copy):
    conf = deploy_copy / "kubernetes" / "redis" / "redis.conf"
    conf.write_text(conf.read_text().replace("maxmemory-policy noeviction", "maxmemory-policy allkeys-lru")
                    .replace("appendonly yes", "appendonly no"))
    text = failures(deploy_copy, "cross")
    assert "kubernetes/redis/redis.conf: maxmemory-policy is 'allkeys-lru', must be 'noeviction'" in text
    assert "kubernetes/redis/redis.conf: appendonly is 'no', must be 'yes'" in text


@pytest.mark.timeout(120)
def test_redis_maxmemory_must_exceed_shared_bytes(deploy_copy):
    conf = deploy_copy / "kubernetes" / "redis" / "redis.conf"
    conf.write_text(conf.read_text().replace("maxmemory 6gb", "maxmemory 4gb"))
    assert "maxmemory 4294967296 leaves under 25% above latent_cache.shared_bytes" in failures(deploy_copy, "cross")


@pytest.mark.timeout(120)
def test_compose_schema_violation_fails(deploy_copy):
    path = deploy_copy / "compose.yaml"
    path.write_text(path.read_text().replace("      interval: 5s", "      interval: 5"))
    text = failures(deploy_copy, "compose")
    assert "compose.yaml: schema: services.redis.healthcheck.interval: 5 is not of type 'string'" in text


@pytest.mark.timeout(120)
def test_compose_unknown_service_key_fails(deploy_copy):
    path = deploy_copy / "compose.yaml"
    path.write_text(path.read_text().replace("  shm_size: 2gb", "  shm_size: 2gb\n  gpus_please: 1"))
    text = failures(deploy_copy, "compose")
    assert "services.triton-a" in text and "'gpus_please' was unexpected" in text


@pytest.mark.timeout(120)
def test_compose_and_kubernetes_must_pass_the_same_flags(deploy_copy):
    path = deploy_copy / "compose.yaml"
    path.write_text(path.read_text().replace(
        '["--redis-url", "redis://redis:6379/0", "--replica-id", "triton-b"]', '["--replica-id", "triton-b"]'))
    text = failures(deploy_copy, "cross")
    assert "compose.yaml: services.triton-b.command passes ['--replica-id']" in text
    assert "compose.yaml: services.triton-b.command: --redis-url is missing" in text


@pytest.mark.timeout(120)
def test_redis_url_must_name_the_redis_service(deploy_copy):
    path = deploy_copy / "kubernetes" / "triton-deployment.yaml"
    edit_yaml(path, lambda docs: triton_container(docs)["args"].__setitem__(1, "redis://redis-main:6379/0"))
    assert "--redis-url host 'redis-main' is not the Redis service" in failures(deploy_copy, "cross")


@pytest.mark.timeout(120)
def test_hpa_metric_must_be_served_by_the_adapter(deploy_copy):
    path = deploy_copy / "kubernetes" / "triton-hpa.yaml"
    edit_yaml(path, lambda docs: docs[0]["spec"]["metrics"][0]["pods"]["metric"].update(name="queue_depth"))
    assert "scales on Pods metric 'queue_depth', which no prometheus-adapter rule serves" in failures(
        deploy_copy, "cross")


@pytest.mark.timeout(120)
def test_hadolint_findings_fail(deploy_copy):
    path = deploy_copy / "Dockerfile"
    path.write_text(path.read_text() + "USER root\nRUN cd /tmp && echo unpinned\n")
    text = failures(deploy_copy, "dockerfile")
    assert "Dockerfile: hadolint" in text and "DL3003" in text
    assert "Dockerfile: USER: the last USER is root" in text


# -- the image's repository step and Redis's start script ------------------------------------------
def configs_only(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    for config in (ROOT / "model_repository").glob("*/config.pbtxt"):
        (source / config.parent.name).mkdir(parents=True)
        shutil.copy2(config, source / config.parent.name / "config.pbtxt")
    return source


@pytest.mark.timeout(120)
def test_configure_repository_sets_and_checks_parameters(tmp_path):
    from nirvana.config import CacheConfig, parse_parameters, read_pbtxt_parameters

    source = configs_only(tmp_path)
    stamp = tmp_path / "stamp"
    stamp.write_text("model\n")
    script = [sys.executable, str(DEPLOY / "configure_repository.py")]
    settings = ["latent_cache.device_bytes=8589934592", "latent_cache.use_gpu=true", "latent_cache.snapshot_path="]
    proc = subprocess.run(script + [str(source), str(tmp_path / "good"), "--stamp", str(stamp)]
                          + [arg for item in settings for arg in ("--set", item)],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    config = parse_parameters(CacheConfig, read_pbtxt_parameters(tmp_path / "good" / "latent_cache" / "config.pbtxt"))
    assert (config.device_bytes, config.use_gpu, config.snapshot_path) == (8 << 30, True, "")
    assert (tmp_path / "good" / ".exported").read_text() == "model\n"

    proc = subprocess.run(script + [str(source), str(tmp_path / "bad"), "--set", "latent_cache.devce_bytes=1"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1
    assert "latent_cache/config.pbtxt: unknown parameter 'devce_bytes' for CacheConfig" in proc.stderr
    assert not (tmp_path / "bad").exists()


def run_start_script(tmp_path: Path, password: str) -> subprocess.CompletedProcess:
    """deploy's Redis start script against a stand-in redis-server that records what it was given."""
    fake = tmp_path / "bin" / "redis-server"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat > {tmp_path}/stdin\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "NIRVANA_REDIS_PASSWORD": password}
    return subprocess.run(["sh", str(DEPLOY / "kubernetes" / "redis" / "start.sh")], capture_output=True,
                          text=True, env=env, timeout=30)


@pytest.mark.timeout(120)
def test_redis_start_script_passes_the_password_on_stdin(tmp_path):
    proc = run_start_script(tmp_path, "s3cret-Token_value.~")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().split() == ["/etc/redis/redis.conf", "-"]
    assert (tmp_path / "stdin").read_text() == 'requirepass "s3cret-Token_value.~"\n'


@pytest.mark.timeout(120)
@pytest.mark.parametrize("password, says", [("REPLACE_ME", "set NIRVANA_REDIS_PASSWORD"),
                                            ("", "set NIRVANA_REDIS_PASSWORD"),
                                            ('pa"ss word', "only letters, digits")])
def test_redis_start_script_refuses_placeholder_and_unsafe_passwords(tmp_path, password, says):
    proc = run_start_script(tmp_path, password)
    assert proc.returncode == 1 and says in proc.stderr
    assert not (tmp_path / "args").exists()
