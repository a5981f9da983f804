"""Where the control-plane binaries are: `KILN_TEST_BIN`, else `KUBEBUILDER_ASSETS`, else PATH.

`make test` sets KILN_TEST_BIN to the folder hack/install-test-tools.sh builds. Tools a test only sometimes
needs (helm, kubectl) are looked up the same way, the binaries folder first.
"""

import os
import shutil
from pathlib import Path

SCHEDULER = "kube-scheduler"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", SCHEDULER)
MISSING = "integration tests need"


def folders() -> list[Path]:
    """The folders searched before PATH, in order."""
    found = []
    for var in ("KILN_TEST_BIN", "KUBEBUILDER_ASSETS"):
        value = os.environ.get(var, "").strip()
        if value:
            found.append(Path(value))
    return found


def find(name: str) -> Path | None:
    """The executable `name` from the binaries folders, else from PATH, else None."""
    for folder in folders():
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which(name)
    return Path(on_path) if on_path else None


def control_plane(*, scheduler: bool = True) -> dict[str, Path]:
    """Every control-plane binary (without kube-scheduler when ``scheduler`` is False), or a LookupError whose
    message is the one-line skip reason."""
    names = [name for name in CONTROL_PLANE if scheduler or name != SCHEDULER]
    found = {name: find(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise LookupError(
            f"{MISSING} {', '.join(missing)}: run `make test` (it builds them with "
            "hack/install-test-tools.sh, which needs Go) or set KILN_TEST_BIN to a folder holding them"
        )
    return {name: path for name, path in found.items() if path is not None}


# What the real node runs beside the control plane: hack/install-node-tools.sh builds all but runc (Debian's),
# and hack/install-test-tools.sh links them into the binaries folder.
NODE = (
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "crictl",
    "coredns",
    "pause",
    "bridge",
    "host-local",
    "loopback",
    "portmap",
    "runc",
    "iptables",
    "nft",
    "ip",
)
NODE_MISSING = "the real node needs"


def node() -> dict[str, Path]:
    """Every binary the real node needs, or a LookupError whose message says which are missing and how to get
    them."""
    found = {name: find(name) for name in NODE}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise LookupError(
            f"{NODE_MISSING} {', '.join(missing)}: run `make test` or `make cluster` as root "
            "(hack/install-test-tools.sh builds them with Go and installs runc, iptables and nftables from Debian) "
            "or set KILN_TEST_BIN"
        )
    return {name: path for name, path in found.items() if path is not None}
