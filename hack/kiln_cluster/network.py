"""The node's network: one bridge, addresses only in 198.18.0.0/15, and a guard so nothing leaves the machine.

Layout (RFC 2544's benchmarking range, never routed on the internet):

- bridge `kiln0` holds the node address 198.18.0.1/24; the CNI bridge plugin attaches pod veths to it and
  hands out 198.18.0.2-254 (the pod CIDR). The API server, kubelet, CoreDNS and kube-proxy's health port
  listen on the node address.
- Services get ClusterIPs in 198.19.0.0/24, routed into the bridge; kube-proxy (iptables mode) DNATs them.
- The guard: a mangle-table chain on FORWARD and POSTROUTING (kube-proxy's ACCEPT rules sit in the filter
  table, so they cannot jump over it) drops every packet from or to 198.18.0.0/15 that would leave through
  any interface but the bridge or loopback. The bridge plugin runs with ipMasq off, so nothing is NATed out.

`snapshot_sysctls` / `restore_sysctls` and `save_ruleset` / `restore_ruleset` let `down` put the machine back
exactly as `up` found it (kubelet and kube-proxy change sysctls and leave nf_tables tables behind).
"""

import contextlib
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCHMARK_RANGE = "198.18.0.0/15"
GUARD_CHAIN = "KILN-GUARD"

# Every sysctl kubelet, kube-proxy or the CNI plugins are known to write.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.ipv6.conf.all.forwarding",
)


@dataclass(frozen=True)
class Addresses:
    """The cluster's address plan; everything inside BENCHMARK_RANGE (checked at construction)."""

    bridge: str = "kiln0"
    node_ip: str = "198.18.0.1"
    pod_cidr: str = "198.18.0.0/24"
    service_cidr: str = "198.19.0.0/24"

    def __post_init__(self) -> None:
        allowed = ipaddress.IPv4Network(BENCHMARK_RANGE)
        for value in (self.node_ip, self.pod_cidr, self.service_cidr):
            if not ipaddress.IPv4Network(value, strict=False).subnet_of(allowed):
                raise ValueError(f"{value} is outside {BENCHMARK_RANGE}: test clusters use only that range")

    @property
    def api_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first address of the service range."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.pod_cidr).prefixlen


def run(*argv: str, check: bool = True) -> str:
    """Run a host networking command; its stdout. A failure names the command and what it printed."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return done.stdout


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def bring_up(addr: Addresses) -> None:
    """Create the bridge with the node address, route the service range into it, install the guard."""
    if link_exists(addr.bridge):
        raise RuntimeError(f"interface {addr.bridge} exists already: is a kiln cluster up? (`make cluster-down`)")
    run("ip", "link", "add", addr.bridge, "type", "bridge")
    run("ip", "addr", "add", f"{addr.node_ip}/{addr.prefix}", "dev", addr.bridge)
    run("ip", "link", "set", addr.bridge, "up")
    run("ip", "route", "add", addr.service_cidr, "dev", addr.bridge, "src", addr.node_ip)
    install_guard(addr)
    # Pod -> Service -> pod on the same bridge needs bridged replies to pass conntrack (kube-proxy checks it).
    write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
    write_sysctl("net.ipv4.ip_forward", "1")


def install_guard(addr: Addresses) -> None:
    """Drop anything of the benchmarking range that would leave through another interface than the bridge."""
    run("iptables", "-t", "mangle", "-N", GUARD_CHAIN)
    for direction in ("-s", "-d"):
        run(
            "iptables", "-t", "mangle", "-A", GUARD_CHAIN, direction, BENCHMARK_RANGE,
            "!", "-o", addr.bridge, "-j", "DROP",
        )  # fmt: skip
    for hook in ("FORWARD", "POSTROUTING"):
        # Loopback is never "leaving": the host talks to itself (and to the node address) over lo.
        run("iptables", "-t", "mangle", "-I", hook, "1", "!", "-o", "lo", "-j", GUARD_CHAIN)


def tear_down(addr: Addresses) -> None:
    """Remove the bridge (its veths went with the pods' network namespaces) and its route."""
    if link_exists(addr.bridge):
        run("ip", "link", "set", addr.bridge, "down", check=False)
        run("ip", "link", "delete", addr.bridge, check=False)
    for link in Path("/sys/class/net").iterdir():
        # A veth whose pod sandbox was never torn down (a crashed containerd) still has its master here.
        master = link / "master"
        if master.exists() and master.resolve().name == addr.bridge:
            run("ip", "link", "delete", link.name, check=False)


# -- sysctls --------------------------------------------------------------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys", *name.split("."))


def read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value)


def snapshot_sysctls() -> dict[str, str]:
    """The current value of every sysctl in SYSCTLS that this kernel has."""
    return {name: value for name in SYSCTLS if (value := read_sysctl(name)) is not None}


def restore_sysctls(saved: dict[str, str]) -> None:
    for name, value in saved.items():
        if read_sysctl(name) != value:
            with contextlib.suppress(OSError):
                write_sysctl(name, value)


# -- nf_tables ------------------------------------------------------------------------------------------------


def save_ruleset() -> str:
    """The whole nf_tables ruleset (iptables here is the nf_tables backend, so this holds its rules too)."""
    return run("nft", "list", "ruleset")


def restore_ruleset(saved: str) -> None:
    """Put back exactly the ruleset `save_ruleset` returned: kube-proxy's chains, the guard and any table
    created meanwhile go."""
    run("nft", "flush", "ruleset")
    if saved.strip():
        done = subprocess.run(["nft", "-f", "-"], input=saved, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"nft -f (restoring the saved ruleset) failed: {done.stderr.strip()}")
