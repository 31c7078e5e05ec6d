"""Where a running endpoint is reached from other machines, and the key of its record.

`trainpipe serve` records what it serves on the registered model (pipelines.serving.endpoint), under
a key and with a URL that `trainpipe status` and the flow then use. Bound to one address (127.0.0.1
by default, or a machine's own), an endpoint is reached there and only one can hold that port:
key endpoint/<host>-<port>, URL http://<host>:<port>. Bound to every interface (0.0.0.0 or ::, as
in a container or a Kubernetes pod), the address says neither: the replicas of a Deployment all bind
0.0.0.0:5001, each on a machine of its own. Such an endpoint records itself under its machine's name
(unique per pod) and gives the address that name resolves to (a pod's IP, which the kubelet writes
into the pod's /etc/hosts; a compose container's likewise), or the name itself where it resolves to
loopback (127.0.1.1 on Debian) or not at all.
"""

import ipaddress
import socket

from pipelines.adapters.registry import endpoint_tag

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def reachable_host(hostname: str) -> str:
    """The address other machines reach `hostname` at: what it resolves to here, unless loopback."""
    try:
        address = socket.gethostbyname(hostname)
    except OSError:
        return hostname
    return hostname if ipaddress.ip_address(address).is_loopback else address


def endpoint_address(host: str, port: int, hostname: str | None = None) -> tuple[str, str]:
    """(record key, URL) of an endpoint bound to host:port; hostname is this machine's name
    (socket.gethostname() unless given), used only when host is a wildcard address."""
    if host not in WILDCARD_HOSTS:
        return endpoint_tag(host, port), f"http://{host}:{port}"
    hostname = hostname or socket.gethostname()
    return endpoint_tag(hostname, port), f"http://{reachable_host(hostname)}:{port}"
