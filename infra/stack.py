"""The team stack on this machine: PostgreSQL, SeaweedFS (S3), an MLflow tracking server and a
Prefect server with a process worker, all real, all on 127.0.0.1, started from pip wheels.

    python -m infra.stack up | down | status | env      (or: make stack / stack-down / stack-status)

Its state lives under one git-ignored folder (default .stack/): data, logs/, run/ (one pid file
per server), secrets.json (passwords and the S3 keys of each identity, generated at first start,
mode 600) and seaweedfs-security/ (the certificates of SeaweedFS's gRPC ports and the
security.toml that names them). stack.env beside it holds the variables that point trainpipe,
mlflow, prefect and dvc at the stack; `source .stack/stack.env` and every command works against
it unchanged. serve.env holds what an endpoint gets: the registry's login and S3's read-only keys.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from infra import servers
from pipelines.core.data import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).with_name("stack.toml")
SERVICES = ["postgres", "seaweedfs", "mlflow", "prefect", "worker"]  # start order; stop is reversed


class StackError(Exception):
    """A server that did not start or stop: one line that names it and its log."""


def load_config() -> dict:
    return tomllib.loads(CONFIG.read_text())


@dataclass
class Stack:
    state: Path  # the git-ignored folder that holds everything the stack writes
    port_offset: int = 0  # a second stack (the test tier's) beside a running one
    checkout: Path = ROOT  # the project the worker runs flows in

    def __post_init__(self):
        self.state = self.state.resolve()
        self.config = load_config()
        self.ports = {name: port + self.port_offset for name, port in self.config["ports"].items()}

    # -- secrets and the environment that points clients at the stack ---------------------

    @property
    def secrets_file(self) -> Path:
        return self.state / "secrets.json"

    def secrets(self) -> dict[str, str]:
        """Passwords and keys, generated once; never committed, never printed in full."""
        values = json.loads(self.secrets_file.read_text()) if self.secrets_file.exists() else {}
        wanted = {
            "postgres": servers.new_password(),
            "mlflow_db": servers.new_password(),
            "prefect_db": servers.new_password(),
            "mlflow_admin": servers.new_password(),
            "prefect_auth": servers.new_password(),
            # One S3 identity per role of infra/stack.toml [s3.identities], each with its own keys.
            **{name: value for role in self.s3_roles for name, value in new_s3_keys(role).items()},
            "mlflow_flask_key": servers.new_password(),  # signs the auth app's CSRF tokens
            # SeaweedFS's JWT signing keys (infra/servers.py seaweedfs_command): the filer and the
            # volume server refuse a write (the filer a read too) not signed with them, so the
            # data is reached through S3 and its keys only.
            "seaweedfs_jwt_key": servers.new_password(),
            "seaweedfs_filer_jwt_key": servers.new_password(),
            "seaweedfs_filer_read_jwt_key": servers.new_password(),
        }
        if wanted.keys() <= values.keys():
            return values
        values = {**wanted, **values}
        self.state.mkdir(parents=True, exist_ok=True)
        servers.write_secret(self.secrets_file, json.dumps(values, indent=1))
        return values

    @property
    def s3_roles(self) -> dict[str, list[str]]:
        """Each S3 identity and its actions (infra/stack.toml [s3.identities])."""
        return self.config["s3"]["identities"]

    def s3_keys(self, role: str) -> tuple[str, str]:
        """(access key, secret key) of one S3 identity."""
        if role not in self.s3_roles:
            raise StackError(f"no S3 identity {role!r}; infra/stack.toml has {', '.join(self.s3_roles)}")
        s = self.secrets()
        return s[f"s3_{role}_access_key"], s[f"s3_{role}_secret_key"]

    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def s3_env(self, role: str) -> dict[str, str]:
        """The S3 variables of one identity: its keys and the endpoint boto3, DVC's s3fs and
        MLflow's S3 artifact store read."""
        access_key, secret_key = self.s3_keys(role)
        env = {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": self.config["s3"]["region"],
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint(),  # boto3 and DVC's s3fs read it
        }
        if role in ("mlflow", "serve"):  # the ones that read MLflow's bucket with MLflow's own code
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint()
        return env

    def client_env(self) -> dict[str, str]:
        """What `trainpipe`, `mlflow`, `prefect` and `dvc` need to work against the stack. Its S3
        keys are the DVC remote's: MLflow's server proxies the artifacts (mlflow-artifacts:/
        URIs), so no client reads or writes MLflow's bucket itself."""
        s, cfg = self.secrets(), self.config
        return {
            **self.registry_env(),
            "PREFECT_API_URL": f"http://127.0.0.1:{self.ports['prefect']}/api",
            "PREFECT_API_AUTH_STRING": f"{cfg['prefect']['auth_user']}:{s['prefect_auth']}",
            "TRAINPIPE_DVC_REMOTE": cfg["dvc"]["remote"],
            **self.s3_env("dvc"),
        }

    def registry_env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports['mlflow']}",
            "MLFLOW_TRACKING_USERNAME": self.config["mlflow"]["admin_user"],
            "MLFLOW_TRACKING_PASSWORD": self.secrets()["mlflow_admin"],
        }

    def serve_env(self) -> dict[str, str]:
        """What an endpoint needs: the registry, and S3 keys that read MLflow's bucket and write
        nothing, for a reader that goes to the bucket itself (`trainpipe serve` on this stack
        needs none: it reads through MLflow's proxy)."""
        return {**self.registry_env(), **self.s3_env("serve")}

    def role_env(self, role: str) -> dict[str, str]:
        return {"client": self.client_env, "serve": self.serve_env}[role]()

    def write_env_file(self, role: str = "client") -> Path:
        path = self.state / ENV_FILES[role]
        self.state.mkdir(parents=True, exist_ok=True)
        servers.write_secret(
            path,
            f"# {ENV_FILE_PURPOSE[role]}: source this file.\n"
            + "".join(f"export {k}={v}\n" for k, v in self.role_env(role).items()),
        )
        return path

    def s3(self, role: str = "admin"):
        """An S3 client as one identity (the admin's by default: the stack's own buckets and checks)."""
        return servers.s3_client(self.s3_endpoint(), *self.s3_keys(role), self.config["s3"]["region"])

    @property
    def seaweedfs_security(self) -> Path:
        """The certificates of SeaweedFS's gRPC ports and the security.toml that names them."""
        return self.state / "seaweedfs-security"

    def postgres_uri(self, user: str, database: str, driver: str = "postgresql+psycopg2") -> str:
        password = self.secrets()["mlflow_db" if user == "mlflow" else f"{user}_db"]
        return f"{driver}://{user}:{password}@127.0.0.1:{self.ports['postgres']}/{database}"

    # -- processes ----------------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        return self.state / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def process(self, name: str) -> psutil.Process | None:
        """The running server `name` started, or None. The pid file holds the start time too,
        so a pid the system reused for something else is not taken for ours."""
        try:
            record = json.loads(self.pid_file(name).read_text())
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["started"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except (FileNotFoundError, ValueError, psutil.Error):
            pass
        return None

    def spawn(self, name: str, cmd: list[str], env: dict, user: str | None = None, cwd: Path | None = None):
        for folder in ("run", "logs"):
            (self.state / folder).mkdir(parents=True, exist_ok=True)
        log = self.log_file(name).open("ab")
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the stop reaches its children
            **servers.run_as(user),
            cwd=cwd or self.state,
        )
        started = psutil.Process(proc.pid).create_time()
        atomic_write_text(
            self.pid_file(name), json.dumps({"pid": proc.pid, "started": started, "cmd": cmd[:3]})
        )
        return proc

    def wait_until(self, name: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process(name) is None:
                raise StackError(f"{name} exited while starting; see {self.log_file(name)}")
            if ready():
                return
            time.sleep(0.5)
        raise StackError(f"{name} did not answer within {timeout_s:.0f} s; see {self.log_file(name)}")

    def stop(self, name: str, timeout_s: float = 30) -> bool:
        """SIGTERM to the server's process group, SIGKILL after timeout_s; True if it ran."""
        proc = self.process(name)
        if proc is None:
            self.pid_file(name).unlink(missing_ok=True)
            return False
        group = os.getpgid(proc.pid)
        members = [proc, *proc.children(recursive=True)]
        os.killpg(group, signal.SIGTERM)
        _, alive = psutil.wait_procs(members, timeout=timeout_s)
        if alive:
            os.killpg(group, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=10)
        self.pid_file(name).unlink(missing_ok=True)
        return True

    # -- the servers, in order ----------------------------------------------------------------

    def start_postgres(self) -> None:
        s, port = self.secrets(), self.ports["postgres"]
        data = self.state / "postgres"
        if not (data / "PG_VERSION").exists():
            servers.init_postgres(data, s["postgres"])
        if self.process("postgres") is None:
            cmd, env, user = servers.postgres_command(data, port)
            self.spawn("postgres", cmd, env, user)
        self.wait_until("postgres", lambda: servers.postgres_ready(port, s["postgres"]), 60)
        servers.create_databases(
            port,
            s["postgres"],
            self.config["postgres"]["databases"],
            {"mlflow": s["mlflow_db"], "prefect": s["prefect_db"]},
        )

    def start_seaweedfs(self) -> None:
        s3_config = self.state / "seaweedfs-s3.json"
        s = self.secrets()
        identities = servers.s3_identities(
            self.s3_roles, {role: self.s3_keys(role) for role in self.s3_roles}
        )
        text = json.dumps(identities)
        had_tls = (self.seaweedfs_security / "security.toml").exists()
        servers.seaweedfs_tls(self.seaweedfs_security)
        servers.write_seaweedfs_security(self.seaweedfs_security)
        running = self.process("seaweedfs") is not None
        if running and (not had_tls or not s3_config.exists() or s3_config.read_text() != text):
            raise StackError(
                "seaweedfs runs with older S3 identities or without gRPC TLS, and so does what it "
                "serves: restart the stack (make stack-down && make stack)"
            )
        servers.write_secret(s3_config, text)
        if not running:
            self.spawn(
                "seaweedfs",
                *servers.seaweedfs_command(
                    self.state / "seaweedfs",
                    self.ports,
                    s3_config,
                    {name: s[name] for name in servers.SEAWEEDFS_JWT_KEYS.values()},
                    self.seaweedfs_security,
                ),
            )
        client = self.s3()
        try:
            self.wait_until("seaweedfs", lambda: servers.s3_ready(client), 90)
        finally:  # a weed that could not load its certificates may serve gRPC to anyone: stop it
            grpc = [
                self.ports[name] + 10000
                for name in ("seaweedfs_master", "seaweedfs_volume", "seaweedfs_filer", "s3")
            ]
            clear = [port for port in grpc if servers.grpc_answers_in_the_clear(port)]
            if clear:
                self.stop("seaweedfs")
                raise StackError(
                    f"seaweedfs served gRPC without TLS on {clear} (stopped it); see {self.log_file('seaweedfs')}"
                )
        servers.create_buckets(client, list(self.config["s3"]["buckets"].values()))

    def start_mlflow(self) -> None:
        cfg, s = self.config["mlflow"], self.secrets()
        auth_config = self.state / "mlflow-basic-auth.ini"
        servers.mlflow_auth_config(
            auth_config, self.postgres_uri("mlflow", "mlflow_auth"), cfg["admin_user"], s["mlflow_admin"]
        )
        if self.process("mlflow") is None:
            cmd, env, user = servers.mlflow_command(
                self.ports["mlflow"],
                self.postgres_uri("mlflow", "mlflow"),
                cfg["artifacts"],
                auth_config,
                self.s3_env("mlflow"),  # its own identity: MLflow's bucket and nothing else
            )
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = s["mlflow_flask_key"]
            self.spawn("mlflow", cmd, env, user)
        self.wait_until(
            "mlflow", lambda: servers.http_ready(f"http://127.0.0.1:{self.ports['mlflow']}/health"), 180
        )

    def start_prefect(self) -> None:
        s, cfg = self.secrets(), self.config["prefect"]
        if self.process("prefect") is None:
            self.spawn(
                "prefect",
                *servers.prefect_command(
                    self.ports["prefect"],
                    self.state / "prefect",
                    self.postgres_uri("prefect", "prefect", driver="postgresql+asyncpg"),
                    f"{cfg['auth_user']}:{s['prefect_auth']}",
                ),
            )
        self.wait_until("prefect", self.prefect_answers, 180)
        self.deploy()

    def prefect_answers(self) -> bool:
        try:
            return self.prefect_api("GET", "/health").ok
        except requests.RequestException:
            return False

    def prefect_cli(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.client_env(), "PREFECT_HOME": str(self.state / "prefect-client")}
        proc = subprocess.run(
            [str(servers.BIN / "prefect"), "--no-prompt", *args],
            cwd=self.checkout,
            env=env,
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise StackError(f"prefect {' '.join(args[:2])} failed: {last[0]}")
        return proc

    def deploy(self) -> None:
        """The process work pool and the deployments of infra/prefect.yaml (cron schedule,
        concurrency limit 1): `prefect deploy`, as a team would run it."""
        pool = self.config["prefect"]["work_pool"]
        try:
            self.prefect_api("GET", f"/work_pools/{pool}")
        except requests.HTTPError:
            self.prefect_cli(["work-pool", "create", pool, "--type", "process"])
        self.prefect_cli(["deploy", "--prefect-file", str(self.checkout / "infra" / "prefect.yaml"), "--all"])

    def start_worker(self) -> None:
        if self.process("worker") is not None:
            return
        self.recover_orphans()
        pool = self.config["prefect"]["work_pool"]
        env = {
            **self.client_env(),
            "PREFECT_HOME": str(self.state / "prefect-worker"),
            "TRAINPIPE_CHECKOUT": str(self.checkout),
            "PYTHONPATH": str(self.checkout),  # the checkout's code, not whichever the venv installed
            "PATH": f"{servers.BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # dvc repro runs `python -m`
        }
        cmd = [str(servers.BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
        self.spawn("worker", cmd, env, cwd=self.checkout)
        self.wait_until("worker", lambda: self.worker_online(pool), 120)

    def recover_orphans(self) -> list[dict]:
        """Flow runs this machine's worker left behind when it stopped with them: Prefect still
        says RUNNING, but their process is gone. Each is marked CRASHED and started again from
        its deployment; the new run resumes training from the last checkpoint (train stage),
        and the workspace lock died with the old process. Returns the (old, new) pairs."""
        pool = self.config["prefect"]["work_pool"]
        query = {
            "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
            "work_pools": {"name": {"any_": [pool]}},
        }
        recovered = []
        for run in self.prefect_api("POST", "/flow_runs/filter", json=query).json():
            pid = str(run.get("infrastructure_pid") or "").rpartition(":")[2]
            if not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue
            message = f"its process ({pid}) stopped with the worker; started again as a new run"
            state = {"type": "CRASHED", "name": "Crashed", "message": message}
            self.prefect_api(
                "POST", f"/flow_runs/{run['id']}/set_state", json={"state": state, "force": True}
            )
            new = self.prefect_api(
                "POST",
                f"/deployments/{run['deployment_id']}/create_flow_run",
                json={"parameters": run["parameters"], "tags": [*run["tags"], f"restarts:{run['id']}"]},
            ).json()
            recovered.append({"crashed": run["id"], "restarted": new["id"]})
        return recovered

    def worker_online(self, pool: str) -> bool:
        """A work pool is READY while at least one worker polls it."""
        try:
            return self.prefect_api("GET", f"/work_pools/{pool}").json()["status"] == "READY"
        except requests.RequestException:
            return False

    def prefect_api(self, method: str, path: str, **kwargs) -> requests.Response:
        """Prefect's REST API with the stack's auth string (Basic auth, as Prefect's client sends it)."""
        user, _, password = self.client_env()["PREFECT_API_AUTH_STRING"].partition(":")
        url = f"http://127.0.0.1:{self.ports['prefect']}/api{path}"
        response = requests.request(method, url, auth=(user, password), timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def mlflow_api(self, method: str, path: str, **kwargs) -> requests.Response:
        env = self.client_env()
        url = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow{path}"
        auth = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
        response = requests.request(method, url, auth=auth, timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def up(self, log=print) -> None:
        for name in SERVICES:
            was_running = self.process(name) is not None
            t0 = time.monotonic()
            getattr(self, f"start_{name}")()
            log(
                f"{name:10s} {'already running' if was_running else 'started'} ({time.monotonic() - t0:.1f} s)"
            )
        log(f"environment: source {self.write_env_file()}")
        log(f"an endpoint's (read-only S3 keys): {self.write_env_file('serve')}")

    def down(self, log=print) -> None:
        for name in reversed(SERVICES):
            if self.stop(name):
                log(f"{name:10s} stopped")

    def status(self) -> list[dict]:
        """Each server: its pid if running, its address, and whether it answers."""
        rows = []
        for name in SERVICES:
            proc = self.process(name)
            port = {"seaweedfs": self.ports["s3"], "worker": None}.get(name, self.ports.get(name))
            rows.append(
                {
                    "name": name,
                    "pid": proc.pid if proc else None,
                    "port": port,
                    "log": str(self.log_file(name)),
                }
            )
        return rows


def new_s3_keys(role: str) -> dict[str, str]:
    """A fresh key pair for one S3 identity: an access key of 20 upper-case letters and digits
    that names its role, and a secret key."""
    tag = "".join(c for c in role.upper() if c.isalnum())[:6]
    body = servers.new_password().upper().replace("-", "X").replace("_", "Y")
    return {
        f"s3_{role}_access_key": ("TP" + tag + body)[:20],
        f"s3_{role}_secret_key": servers.new_password(),
    }


# `env --role` and the file each role's variables are written to, beside secrets.json.
ENV_FILES = {"client": "stack.env", "serve": "serve.env"}
ENV_FILE_PURPOSE = {
    "client": "Points trainpipe, mlflow, prefect and dvc at the team stack",
    "serve": "What an endpoint of the team stack gets: the registry and read-only S3 keys",
}


def masked(key: str, value: str) -> str:
    """A secret's first 4 characters only: enough to tell two apart, useless to anyone else."""
    secret = any(word in key for word in ("PASSWORD", "SECRET", "AUTH_STRING", "ACCESS_KEY"))
    if not secret:
        return value
    head, sep, tail = value.rpartition(":") if key.endswith("AUTH_STRING") else ("", "", value)
    return f"{head}{sep}{tail[:4]}…(in secrets.json)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    add_stack_options(parser)
    args = parser.parse_args(argv)
    try:
        run_action(args.action, Stack(Path(args.state), args.port_offset), args.role)
    except Exception as exc:
        reason = failure_reason(exc)
        if reason is None:
            raise
        print(f"stack {args.action}: {reason}", file=sys.stderr)
        sys.exit(1)


def failure_reason(exc: Exception) -> str | None:
    """One line for a failure a user can act on; None for a bug (let its traceback show)."""
    if isinstance(exc, StackError | RuntimeError | subprocess.CalledProcessError):
        return str(exc)
    if isinstance(exc, FileNotFoundError | ImportError):  # a server or client of the stack extra is missing
        return f"{exc}: `make stack` installs the stack's servers and clients"
    return None


def add_stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state", default=str(ROOT / ".stack"), help="folder for data, logs and secrets (default .stack)"
    )
    parser.add_argument(
        "--port-offset", type=int, default=0, help="add to every port of infra/stack.toml (default 0)"
    )
    parser.add_argument(
        "--role",
        choices=list(ENV_FILES),
        default="client",
        help="env: whose variables (client: trainpipe, dvc, prefect, mlflow; serve: an endpoint's "
        "registry login and read-only S3 keys; default client)",
    )


def run_action(action: str, stack: Stack, role: str = "client") -> None:
    if action == "up":
        stack.up()
    elif action == "down":
        stack.down()
        print("stack stopped" if stack.state.exists() else "no stack state here")
    elif action == "status":
        for row in stack.status():
            where = f"127.0.0.1:{row['port']}" if row["port"] else ""
            state = f"running, pid {row['pid']}" if row["pid"] else "stopped"
            print(f"{row['name']:10s} {state:20s} {where:16s} log {row['log']}")
    elif action == "env":
        for key, value in stack.role_env(role).items():
            print(f"{key}={masked(key, value)}")
        print(f"# the full values: source {stack.write_env_file(role)}")


if __name__ == "__main__":
    main()
