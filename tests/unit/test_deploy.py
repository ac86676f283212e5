"""The deployment files checked where they can be without a container daemon or a cluster:
the Dockerfile (parsed into stages and instructions; its command, paths, ports and health
check against the package and the Kubernetes manifest), .dockerignore (the build context holds
what `pip wheel .` needs), deploy/kubernetes/fastgw.yaml (Kubernetes' own schemas, strict;
probes, ports, the drain's timing, the ConfigMap's file through `fastgw check`; the probes'
commands run against a real HTTP server) and deploy/grafana/fastgw.json (its structure and
that it shows what the README documents). tests/e2e/test_dashboard.py checks the dashboard's
queries against a real gateway's /metrics."""

from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fastgw import cli
from fastgw.config.values import parse_duration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MANIFEST = ROOT / "deploy" / "kubernetes" / "fastgw.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fastgw.json"
FASTGW = (sys.executable, "-m", "fastgw")

# ---- the Dockerfile, parsed ------------------------------------------------------------------

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(?:--[a-z-]+=\S+\s+)*CMD\s+", "", text)
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base}: no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(the ARGs declared before the first FROM with their defaults, the stages) of a
    Dockerfile: comments dropped, `\\` continuations joined, `${ARG}` in FROM resolved."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue                          # a comment (or a parser directive)
        if pending and line.startswith("#"):
            continue                          # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append((start, pending + line))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        assert keyword in INSTRUCTIONS, f"Dockerfile:{number}: unknown instruction {keyword}"
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"Dockerfile:{number}: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda v: args[v[1] or v[2]], m[1])
            stages.append(Stage(base, m[2]))
        else:
            assert stages, f"Dockerfile:{number}: {keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, rest, number))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def manifest() -> dict[tuple[str, str], dict]:
    """{(kind, name): object} of the manifest."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(objects) == len(docs), "two objects of one kind and name"
    return objects


@pytest.fixture(scope="module")
def gateway_config(manifest) -> dict:
    return yaml.safe_load(manifest["ConfigMap", "fastgw"]["data"]["fastgw.yaml"])


def container(manifest) -> dict:
    """The gateway's container."""
    (c,) = [c for c in manifest["Deployment", "fastgw"]["spec"]["template"]["spec"]["containers"]
            if c["name"] == "fastgw"]
    return c


def image_command(stages: list[Stage]) -> list[str]:
    runtime = stages[-1]
    return runtime.last("ENTRYPOINT").exec_form() + runtime.last("CMD").exec_form()


def test_the_parser_joins_continuations_and_resolves_args():
    args, parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG V=3.12\nFROM python:${V}-slim AS build\n"
        "RUN apt-get update \\\n  # a comment\n && true\nFROM python:$V-slim\nCMD [\"a\"]\n")
    assert args == {"V": "3.12"}
    assert [(s.base, s.name) for s in parsed] == [("python:3.12-slim", "build"), ("python:3.12-slim", None)]
    assert parsed[0].instructions == [Instruction("RUN", "apt-get update && true", 4)]
    with pytest.raises(AssertionError, match="unknown instruction"):
        parse_dockerfile("FROM x\nCOPPY a b\n")


def test_dockerfile_builds_the_wheel_then_installs_only_it(stages):
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert build.name and re.fullmatch(r"python:3\.1[1-9]-slim", build.base), build
    assert runtime.base == build.base, "the wheel is built for the runtime's Python"
    from packaging.specifiers import SpecifierSet
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.search(r"python:(\d+\.\d+)", runtime.base)[1] in SpecifierSet(requires)
    build_runs = " ".join(i.args for i in build.all("RUN"))
    assert "build-essential" in build_runs
    m = re.search(r"pip wheel .*--wheel-dir (\S+) \.(?:\s|$)", build_runs)
    assert m, build_runs
    wheels = m[1]
    # The runtime stage: fastgw from those wheels alone, no compiler, no source.
    (install,) = [i for i in runtime.all("RUN") if "pip install" in i.args]
    mount = re.search(r"--mount=type=bind,from=(\S+?),source=(\S+?),target=(\S+)", install.args)
    assert mount and mount[1] == build.name and mount[2] == wheels, install
    assert re.search(rf"pip install .*--no-index --find-links {re.escape(mount[3])} fastgw\b", install.args)
    assert not runtime.all("COPY") and not runtime.all("ADD")
    assert "build-essential" not in " ".join(i.args for i in runtime.all("RUN"))


def test_dockerfile_runs_fastgw_as_a_non_root_user(stages, manifest):
    runtime = stages[-1]
    user = runtime.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (runAsNonRoot can check it)"
    created = " ".join(i.args for i in runtime.all("RUN"))
    assert re.search(rf"useradd .*--uid {uid}\b", created), "the user exists in the image"
    assert not gid or re.search(rf"groupadd .*--gid {gid}\b.*useradd .*--gid {gid}\b", created), \
        "and its group"
    for name in ("fastgw", "fastgw-echo"):
        pod = manifest["Deployment", name]["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(uid)
        assert not gid or pod["runAsGroup"] == int(gid)


def test_the_image_command_is_fastgw_run_on_the_mounted_file(stages, manifest):
    command = image_command(stages)
    assert command == ["fastgw", "run", "-c", "/etc/fastgw/fastgw.yaml"]
    # `fastgw` is the package's console script, and `run -c FILE` is what its CLI takes.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fastgw"] == "fastgw.cli:main"
    args = cli.build_parser().parse_args(command[1:])
    assert args.command == "run" and args.config == command[3]
    helptext = subprocess.run([*FASTGW, "run", "--help"], capture_output=True, text=True, timeout=30)
    assert helptext.returncode == 0
    for flag in (a for a in command[1:] if a.startswith("-")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", helptext.stdout), flag
    # The Deployment runs the same, on the file the ConfigMap is mounted as.
    c = container(manifest)
    assert c.get("command") is None and c["args"] == command[1:]
    config_path = Path(command[3])
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    (volume,) = [v for v in manifest["Deployment", "fastgw"]["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "fastgw"
    (item,) = volume["configMap"]["items"]
    assert item["path"] == config_path.name
    assert item["key"] in manifest["ConfigMap", "fastgw"]["data"]


def test_the_image_exposes_the_manifests_ports(stages, manifest, gateway_config):
    runtime = stages[-1]
    exposed = {int(p.split("/")[0]) for i in runtime.all("EXPOSE") for p in i.args.split()}
    config_ports = {l["port"] for l in gateway_config["listeners"]} | {gateway_config["admin"]["port"]}
    assert exposed == config_ports
    assert {p["containerPort"] for p in container(manifest)["ports"]} == config_ports
    assert runtime.last("STOPSIGNAL").args == "SIGTERM", "fastgw drains on SIGTERM"


class Server:
    """A real HTTP server on loopback answering GET PATH with `status` (401 when `token` is
    set and the request does not carry `Authorization: Bearer TOKEN`); `seen` are the paths
    asked."""

    def __init__(self, path: str, status: int = 200, token: str | None = None):
        self.seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen.append(self.path)
                if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    code = 401
                else:
                    code = outer.status if self.path == path else 404
                body = b'{"status": "alive"}'
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.status = status
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_python_c(argv: list[str], env: dict[str, str], code_edit=lambda code: code) -> int:
    """Run a `python -c CODE` probe command (the image's Python is this one) with `env`."""
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, argv
    compile(argv[2], "<probe>", "exec")
    proc = subprocess.run([sys.executable, "-c", code_edit(argv[2])], env={**os.environ, **env},
                          capture_output=True, timeout=30)
    return proc.returncode


def test_the_healthcheck_asks_the_admin_healthz(stages, gateway_config):
    check = stages[-1].last("HEALTHCHECK")
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", check.args))
    assert parse_duration(options["timeout"]) < parse_duration(options["interval"])
    argv = check.exec_form()
    default = re.search(r"'http://127\.0\.0\.1:(\d+)(/\w+)'", argv[2])
    assert default and int(default[1]) == gateway_config["admin"]["port"] and default[2] == "/healthz"
    server = Server("/healthz")
    try:
        url = f"http://127.0.0.1:{server.port}/healthz"
        assert run_python_c(argv, {"FASTGW_HEALTHZ_URL": url}) == 0
        server.status = 503
        assert run_python_c(argv, {"FASTGW_HEALTHZ_URL": url}) != 0
        assert server.seen == ["/healthz", "/healthz"]
    finally:
        server.close()
    assert run_python_c(argv, {"FASTGW_HEALTHZ_URL": url}) != 0, "nothing listens: unhealthy"


# ---- .dockerignore: the build context ----------------------------------------------------------

def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """(exclusion?, regex) per line: Docker's rules (Go's filepath.Match, `**` for any
    number of directories, `!` re-includes, the last match wins)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:].strip() if include else line
        pattern = os.path.normpath(pattern).lstrip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        out.append((include, re.compile(rx + r"\Z")))
    return out


def in_context(path: str, patterns) -> bool:
    """Whether `path` (relative to the context) is sent to the builder."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for include, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            excluded = not include
    return not excluded


def test_the_dockerignore_matcher():
    patterns = dockerignore_patterns("build\n**/*.so\n*.md\n!README.md\n")
    assert not in_context("build/lib/x.py", patterns)
    assert not in_context("src/fastgw/_core.so", patterns) and not in_context("a.so", patterns)
    assert in_context("src/build.py", patterns) and in_context("README.md", patterns)
    assert not in_context("CHANGES.md", patterns) and in_context("docs/a.md", patterns)


def test_the_build_context_holds_what_pip_wheel_needs():
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", "setup.py"} | {p for p in tracked if p.startswith("src/")}
    readme = project.get("readme")
    needed.add(readme if isinstance(readme, str) else readme["file"])
    license_ = project.get("license")
    if isinstance(license_, dict) and "file" in license_:
        needed.add(license_["file"])
    for pattern in project.get("license-files", []):
        needed |= {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}
    assert all((ROOT / p).exists() for p in needed)
    left_out = sorted(p for p in needed if not in_context(p, patterns))
    assert not left_out, f".dockerignore leaves out what the build needs: {left_out}"
    # Nothing built here (a stale core, a venv) nor the repository goes in.
    for built in (".git/HEAD", ".venv/bin/python", "build/lib/fastgw/_core.so", "dist/fastgw.whl",
                  "src/fastgw/_core.c", "src/fastgw/_core.cpython-312-x86_64-linux-gnu.so",
                  "src/fastgw/__pycache__/cli.cpython-312.pyc", "src/fastgw.egg-info/PKG-INFO"):
        assert not in_context(built, patterns), built


# ---- the Kubernetes manifest -------------------------------------------------------------------

K8S_VERSIONS = ("1.27.0", "1.33.0")           # the schemas it is checked against, strictly


def test_manifest_objects_validate_against_kubernetes_schemas(manifest):
    import kubernetes_validate
    assert {kind for kind, _ in manifest} == {"ConfigMap", "Deployment", "Service"}
    for obj in manifest.values():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    broken = copy.deepcopy(manifest["Deployment", "fastgw"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpget"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="httpget"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_services_select_the_pods_and_name_their_ports(manifest):
    for (kind, name), svc in manifest.items():
        if kind != "Service":
            continue
        deployment = manifest["Deployment", name]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert svc["spec"]["selector"].items() <= labels.items()
        ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)


def test_the_configmaps_file_passes_fastgw_check_with_the_secrets_token(manifest, gateway_config, tmp_path):
    text = manifest["ConfigMap", "fastgw"]["data"]["fastgw.yaml"]
    path = tmp_path / "fastgw.yaml"
    path.write_text(text)
    token_env = gateway_config["admin"]["token-env"]
    (env,) = [e for e in container(manifest)["env"] if e["name"] == token_env]
    assert env["valueFrom"]["secretKeyRef"]["name"] and env["valueFrom"]["secretKeyRef"]["key"]
    clean = {k: v for k, v in os.environ.items() if k != token_env}
    ok = subprocess.run([*FASTGW, "check", "-c", str(path)], env={**clean, token_env: "t0ken"},
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # Beyond loopback the token is what makes it valid: without it, check refuses the file.
    assert gateway_config["admin"]["host"] == "0.0.0.0"
    missing = subprocess.run([*FASTGW, "check", "-c", str(path)], env=clean,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and token_env in missing.stderr


def _port(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return p


def test_probes_ask_the_admin_api(manifest, gateway_config):
    c = container(manifest)
    admin_port = gateway_config["admin"]["port"]
    for probe in ("livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and _port(c, get["port"]) == admin_port, probe
    ready = c["readinessProbe"]["exec"]["command"]
    url = re.search(r"'http://127\.0\.0\.1:(\d+)(/\w+)'", ready[2])
    assert url and int(url[1]) == admin_port and url[2] == "/readyz"
    # Run the probe's command against a real server that wants the token.
    token_env = gateway_config["admin"]["token-env"]
    server = Server("/readyz", token="s3cret")
    to_server = lambda code: code.replace(f":{admin_port}/", f":{server.port}/")  # noqa: E731
    try:
        assert run_python_c(ready, {token_env: "s3cret"}, to_server) == 0
        assert run_python_c(ready, {token_env: "wrong"}, to_server) != 0
        server.status = 503                        # draining
        assert run_python_c(ready, {token_env: "s3cret"}, to_server) != 0
        assert server.seen == ["/readyz"] * 3
    finally:
        server.close()
    assert c["readinessProbe"]["timeoutSeconds"] < c["readinessProbe"]["periodSeconds"]


def test_the_grace_covers_the_prestop_wait_and_the_drain(manifest, gateway_config):
    spec = manifest["Deployment", "fastgw"]["spec"]["template"]["spec"]
    c = container(manifest)
    wait = c["lifecycle"]["preStop"]["exec"]["command"]
    assert wait[0] == "sleep" and len(wait) == 2 and shutil.which("sleep")
    drain = parse_duration(gateway_config["drain-time"])
    assert 0 < drain
    assert spec["terminationGracePeriodSeconds"] > float(wait[1]) + drain
    # A rollout never takes a pod away before its replacement serves.
    strategy = manifest["Deployment", "fastgw"]["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_the_example_backend_is_the_gateways_target(manifest, gateway_config):
    (api,) = gateway_config["apis"]
    target = api["assembly"][-1]["target-url"]
    m = re.fullmatch(r"ws://([\w-]+):(\d+)/", target)
    assert m, target
    svc = manifest["Service", m[1]]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(m[2])]
    (echo,) = manifest["Deployment", m[1]]["spec"]["template"]["spec"]["containers"]
    assert echo["image"] == container(manifest)["image"]
    command = echo["command"]
    assert command[:3] == ["python", "-m", "fastgw.echo"] and importlib.util.find_spec("fastgw.echo")
    assert command[command.index("--port") + 1] == str(_port(echo, port["targetPort"]))
    assert command[command.index("--host") + 1] == "0.0.0.0"
    helptext = subprocess.run([sys.executable, "-m", "fastgw.echo", "--help"], capture_output=True,
                              text=True, timeout=30).stdout
    for flag in (a for a in command[3:] if a.startswith("--")):
        assert flag in helptext, flag


def test_kubectl_accepts_the_manifest():
    """`kubectl apply --dry-run=client`: where kubectl is installed and configured for a
    cluster (a client dry run still reads the server's API list; without a context kubectl
    would ask whatever listens on localhost:8080)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    context = subprocess.run([kubectl, "config", "current-context"], capture_output=True,
                             text=True, timeout=30)
    if context.returncode != 0:
        pytest.skip("kubectl has no cluster configured (no current context)")
    proc = subprocess.run([kubectl, "apply", "--dry-run=client", "-f", str(MANIFEST)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(dry run)") == len(list(yaml.safe_load_all(MANIFEST.read_text())))


# ---- the Grafana dashboard ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels_of(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels_of(dashboard) for t in p.get("targets", [])]


def test_dashboard_structure(dashboard):
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    api = variables["api"]
    assert api["type"] == "query" and api["datasource"]["uid"] == "${datasource}"
    assert api["includeAll"] and api["allValue"] == ".*"      # .* also matches api="" (no API matched)
    ids = [p["id"] for p in panels_of(dashboard)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels_of(dashboard):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip(), p["title"]
    # Every selector of a metric with an `api` label is filtered by the variable.
    for expr in exprs(dashboard):
        for m in re.finditer(r"\b(fastgw_(?!worker|cluster|accept|events|limit_table|connections_max)\w+)(\{[^}]*\})?", expr):
            assert m[2] and 'api=~"$api"' in m[2], f"{m[1]} without the api filter in {expr!r}"


def test_dashboard_shows_every_documented_metric(dashboard):
    readme = (ROOT / "README.md").read_text()
    documented = set()
    for line in readme.splitlines():
        if line.startswith("| `fastgw_"):
            documented |= set(re.findall(r"`(fastgw_\w+)`", line.split("|")[1]))
    assert len(documented) >= 25, documented
    queried = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs(dashboard)
               for n in re.findall(r"\bfastgw_\w+", e)}
    assert documented - queried == set(), f"documented, not on the dashboard: {sorted(documented - queried)}"


@pytest.mark.parametrize("pattern", [
    r"sum by \(api\) \(fastgw_connections_active\{",                       # connections per API
    r"sum by \(reason\) \(rate\(fastgw_upgrades_rejected_total\{",          # refusals by reason
    r"by \(api, direction\) \(rate\(fastgw_messages_total\{",
    r"by \(api, direction\) \(rate\(fastgw_bytes_total\{",
    r"by \([^)]*\baction\b[^)]*\) \(rate\(fastgw_messages_limited_total\{",
    r"sum by \(code, side\) \(rate\(fastgw_closes_total\{",
    r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(fastgw_handshake_seconds_bucket\{",
    r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(fastgw_upstream_connect_seconds_bucket\{",
    r"\bfastgw_workers\b", r"\bfastgw_worker_restarts_total\b",
    r"fastgw_target_connections_active", r"fastgw_target_up", r"fastgw_target_dial_failures_total",
    r"fastgw_cluster_share", r"histogram_quantile\(0\.99, .*fastgw_cluster_redis_seconds_bucket",
])
def test_dashboard_must_show(dashboard, pattern):
    assert any(re.search(pattern, e) for e in exprs(dashboard)), pattern
