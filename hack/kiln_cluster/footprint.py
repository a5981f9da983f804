"""What a cluster leaves on the machine, so `down` can undo it and a test can prove it did.

`Footprint.take()` records the host state a node touches: processes of the node's programs, network links,
the nf_tables ruleset, mounts, kubelet's cgroups, the sysctls kubelet and kube-proxy write, and the fixed
paths kubelet and the CNI plugins use whatever their configuration says. Two footprints compare equal when
`down` removed everything `up` made.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from kiln_cluster import network

PROGRAMS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "coredns",
    "pause",
    "prometheus",
)
# Paths kubelet and libcni create whatever --root-dir says.
FIXED_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/var/lib/cni"),
    Path("/run/containerd"),
    Path("/etc/cni"),
    Path("/opt/cni"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBELET_CGROUPS = ("kubepods", "kubepods.slice", "kubelet", "kubelet.slice")


def node_processes() -> set[tuple[int, str]]:
    """(pid, program) of every running process whose executable is one of PROGRAMS."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if os.path.basename(argv0) in PROGRAMS:
            found.add((int(entry.name), os.path.basename(argv0)))
    return found


def mount_points() -> set[str]:
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.add(line.split()[4])
    return points


def kubelet_cgroups() -> set[str]:
    """Every cgroup folder of kubelet's hierarchy (kubepods and below) under every controller."""
    found: set[str] = set()
    if not CGROUP_ROOT.is_dir():
        return found
    for controller in CGROUP_ROOT.iterdir():
        for name in KUBELET_CGROUPS:
            top = controller / name
            if top.is_dir():
                found.update(str(p) for p in [top, *top.rglob("*")] if p.is_dir())
    return found


@dataclass(frozen=True)
class Footprint:
    processes: frozenset[str]
    links: frozenset[str]
    ruleset: str
    mounts: frozenset[str]
    cgroups: frozenset[str]
    sysctls: tuple[tuple[str, str], ...]
    paths: frozenset[str]

    @classmethod
    def take(cls) -> "Footprint":
        return cls(
            processes=frozenset(f"{name}[{pid}]" for pid, name in node_processes()),
            links=frozenset(p.name for p in Path("/sys/class/net").iterdir()),
            ruleset=network.save_ruleset(),
            mounts=frozenset(mount_points()),
            cgroups=frozenset(kubelet_cgroups()),
            sysctls=tuple(sorted(network.snapshot_sysctls().items())),
            paths=frozenset(str(p) for p in FIXED_PATHS if p.exists()),
        )

    def difference(self, later: "Footprint") -> dict[str, object]:
        """What `later` has that this footprint has not (and the reverse), per kind; empty when equal."""
        diff: dict[str, object] = {}
        for field in ("processes", "links", "mounts", "cgroups", "paths"):
            before, after = getattr(self, field), getattr(later, field)
            if before != after:
                diff[field] = {"added": sorted(after - before), "removed": sorted(before - after)}
        if self.ruleset != later.ruleset:
            diff["ruleset"] = {"before": self.ruleset, "after": later.ruleset}
        if self.sysctls != later.sysctls:
            before_map, after_map = dict(self.sysctls), dict(later.sysctls)
            diff["sysctls"] = {k: (before_map.get(k), v) for k, v in after_map.items() if before_map.get(k) != v}
        return diff
