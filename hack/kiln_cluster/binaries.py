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
