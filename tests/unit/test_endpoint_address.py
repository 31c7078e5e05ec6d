"""The record key and URL of a running endpoint (pipelines/serving/address.py): one record per
replica, at an address other machines reach; an endpoint on 127.0.0.1 keeps endpoint/127.0.0.1-<port>.

    pytest tests/unit/test_endpoint_address.py
"""

import socket

import pytest

from pipelines.serving.address import endpoint_address, reachable_host

# What a pod's /etc/hosts says (the kubelet writes the pod's IP under its name), and a Debian
# machine's, whose name is on 127.0.1.1.
HOSTS = {
    "serve-6c9d-abcde": "10.244.1.17",
    "serve-6c9d-fghij": "10.244.2.9",
    "laptop": "127.0.1.1",
}


@pytest.fixture
def hosts(monkeypatch):
    real = socket.gethostbyname

    def gethostbyname(name: str) -> str:
        if name in HOSTS:
            return HOSTS[name]
        return real(name)

    monkeypatch.setattr(socket, "gethostbyname", gethostbyname)


@pytest.mark.parametrize(
    "host, port, hostname, key, url",
    [
        # bound to one address: reached there, whatever the machine is called (unchanged behaviour)
        ("127.0.0.1", 5001, "serve-6c9d-abcde", "endpoint/127.0.0.1-5001", "http://127.0.0.1:5001"),
        ("127.0.0.1", 5002, "laptop", "endpoint/127.0.0.1-5002", "http://127.0.0.1:5002"),
        ("10.0.0.5", 5001, "laptop", "endpoint/10.0.0.5-5001", "http://10.0.0.5:5001"),
        # bound to every interface in a pod: its name for the key, its IP for the URL
        ("0.0.0.0", 5001, "serve-6c9d-abcde", "endpoint/serve-6c9d-abcde-5001", "http://10.244.1.17:5001"),
        ("::", 5001, "serve-6c9d-fghij", "endpoint/serve-6c9d-fghij-5001", "http://10.244.2.9:5001"),
        # a name on loopback, or one that resolves nowhere: the name itself, for others to resolve
        ("0.0.0.0", 5001, "laptop", "endpoint/laptop-5001", "http://laptop:5001"),
        ("0.0.0.0", 5001, "nowhere.invalid", "endpoint/nowhere.invalid-5001", "http://nowhere.invalid:5001"),
    ],
)
def test_endpoint_address(hosts, host, port, hostname, key, url):
    assert endpoint_address(host, port, hostname) == (key, url)


def test_replicas_on_the_same_wildcard_port_keep_records_of_their_own(hosts):
    """Two pods of one Deployment bind 0.0.0.0:5001: neither overwrites the other's record, and
    neither records the unreachable http://0.0.0.0:5001."""
    a = endpoint_address("0.0.0.0", 5001, "serve-6c9d-abcde")
    b = endpoint_address("0.0.0.0", 5001, "serve-6c9d-fghij")
    assert a[0] != b[0] and a[1] != b[1]
    assert "0.0.0.0" not in a[1] + b[1]


def test_without_a_hostname_a_wildcard_endpoint_is_named_after_this_machine():
    key, url = endpoint_address("0.0.0.0", 5001)
    assert key == f"endpoint/{socket.gethostname()}-5001"
    assert url == f"http://{reachable_host(socket.gethostname())}:5001"
    assert "0.0.0.0" not in url


@pytest.mark.parametrize(
    "hostname, reached",
    [("localhost", "localhost"), ("10.1.2.3", "10.1.2.3"), ("serve-6c9d-abcde", "10.244.1.17")],
)
def test_reachable_host(hosts, hostname, reached):
    assert reachable_host(hostname) == reached
