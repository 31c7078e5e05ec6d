"""The team stack's secrets on disk: one S3 identity per role, and the certificates of
SeaweedFS's gRPC ports (infra/stack.py, infra/servers.py). Nothing starts here; the stack tier
(tests/stack) shows the same against the running servers.

    pytest tests/unit/test_stack_secrets.py
"""

import json
import os
import socket
import ssl
import stat
import threading

import pytest

from infra import servers
from infra.stack import Stack, StackError, run_action


def modes_at_rename(monkeypatch) -> list[int]:
    """The mode of each file at the moment it is renamed into place (atomic_write_text's last step)."""
    modes, real_replace = [], os.replace

    def spy(src, dst, *args, **kwargs):
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    return modes


def test_an_older_secrets_file_gains_a_key_pair_per_identity_and_keeps_its_values(tmp_path, monkeypatch):
    stack = Stack(tmp_path / "state")
    stack.state.mkdir()
    older = {
        "postgres": "pg-pw",
        "mlflow_admin": "admin-pw",
        "s3_access_key": "TPOLD",
        "s3_secret_key": "old",
    }
    stack.secrets_file.write_text(json.dumps(older))
    stack.secrets_file.chmod(0o600)
    modes = modes_at_rename(monkeypatch)
    values = stack.secrets()
    assert modes == [0o600]
    assert {k: values[k] for k in older} == older, "an existing secret changed"
    for role in stack.s3_roles:
        access, secret = stack.s3_keys(role)
        assert len(access) == 20 and access.isalnum() and access.isupper() and len(secret) >= 24, role
    assert len({stack.s3_keys(role) for role in stack.s3_roles}) == len(stack.s3_roles)
    assert json.loads(stack.secrets_file.read_text()) == values
    assert stack.secrets() == values, "a second read made new keys"


def test_each_environment_holds_its_roles_keys_only(tmp_path, capsys):
    stack = Stack(tmp_path / "state")
    assert stack.client_env()["AWS_ACCESS_KEY_ID"] == stack.s3_keys("dvc")[0]
    assert stack.serve_env()["AWS_ACCESS_KEY_ID"] == stack.s3_keys("serve")[0]
    assert not {"PREFECT_API_URL", "TRAINPIPE_DVC_REMOTE"} & set(stack.serve_env())
    run_action("env", stack, "serve")
    out = capsys.readouterr().out
    assert f"AWS_ACCESS_KEY_ID={stack.s3_keys('serve')[0][:4]}…" in out
    assert stack.s3_keys("serve")[1] not in out, "env printed a secret key in full"
    path = stack.state / "serve.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"export AWS_SECRET_ACCESS_KEY={stack.s3_keys('serve')[1]}\n" in path.read_text()


def test_an_unknown_s3_role_is_one_clear_error(tmp_path):
    with pytest.raises(
        StackError, match="no S3 identity 'root'; infra/stack.toml has admin, mlflow, dvc, serve"
    ):
        Stack(tmp_path / "state").s3_keys("root")


def test_grpc_certificates_are_0600_from_their_first_byte_and_the_ca_key_is_not_kept(tmp_path, monkeypatch):
    modes = modes_at_rename(monkeypatch)
    folder = tmp_path / "tls"
    paths = servers.seaweedfs_tls(folder)
    security = servers.write_seaweedfs_security(folder)
    assert modes == [0o600] * 4
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in [*paths.values(), security]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    holding_keys = sorted(p.name for p in folder.iterdir() if "PRIVATE KEY" in p.read_text())
    assert holding_keys == ["seaweedfs.key"], holding_keys
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    servers.seaweedfs_tls(folder)
    servers.write_seaweedfs_security(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "made anew at the second start"
    paths["cert"].unlink()  # a half folder: all three anew, so they still belong together
    again = servers.seaweedfs_tls(folder)
    assert again["ca"].read_bytes() != before["ca.crt"]


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str | None:
    """A TLS 1.3 handshake over loopback, then one byte each way; None if it worked, else why not.
    (In TLS 1.3 the server judges the client's certificate after the client thinks it is done:
    the refusal shows on the first read.)"""
    listener = socket.create_server(("127.0.0.1", 0))
    failure = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(1))
        except (OSError, ssl.SSLError) as exc:
            failure.append(f"server: {exc}")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                tls.sendall(b"x")
                if tls.recv(1) != b"x":
                    failure.append("client: no answer")
    except (OSError, ssl.SSLError) as exc:
        failure.append(f"client: {exc}")
    finally:
        thread.join(timeout=10)
        listener.close()
    return "; ".join(failure) or None


def test_the_certificate_passes_mutual_tls_and_a_peer_without_one_is_refused(tmp_path):
    """What weed's gRPC servers do with security.toml (advancedtls: a client certificate signed by
    the CA is required, host names are not checked), here with Python's ssl on the same files."""
    paths = servers.seaweedfs_tls(tmp_path / "tls")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(paths["cert"], paths["key"])
    server.load_verify_locations(paths["ca"])
    server.verify_mode = ssl.CERT_REQUIRED

    def client(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(paths["ca"])  # the server's certificate must be the CA's
        ctx.check_hostname = False
        if with_cert:
            ctx.load_cert_chain(paths["cert"], paths["key"])
        return ctx

    assert handshake(server, client(with_cert=True)) is None
    refused = handshake(server, client(with_cert=False))
    assert refused and "certificate" in refused.lower(), refused
    stranger = servers.seaweedfs_tls(tmp_path / "other")  # a certificate another CA signed
    other = client(with_cert=False)
    other.load_cert_chain(stranger["cert"], stranger["key"])
    assert handshake(server, other), "a certificate of another CA was let in"


@pytest.mark.parametrize("answer, in_the_clear", [(bytes.fromhex("000000040000000000"), True), (b"", False)])
def test_a_grpc_port_that_answers_plain_http2_is_found(answer, in_the_clear):
    """make stack's check after weed starts: a server that answers a plain HTTP/2 greeting with
    SETTINGS serves gRPC in the clear; one that hangs up (TLS wanted) does not."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert servers.grpc_answers_in_the_clear(listener.getsockname()[1]) is in_the_clear
    finally:
        thread.join(timeout=10)
        listener.close()
