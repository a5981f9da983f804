"""`python -m kiln_cluster up|down|status [--root DIR]`: the single-node cluster `make cluster` runs.

`up` starts every component detached (they outlive this command), waits until the node is Ready, imports
kiln's images and prints `export KUBECONFIG=...` as its last line; `down` stops them and puts the machine back.
"""

import argparse
import os
import sys
from pathlib import Path

from kiln_cluster.cluster import STATE_FILE, Cluster

DEFAULT_ROOT = Path(os.environ.get("KILN_CLUSTER_ROOT", "/tmp/kiln-cluster"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln_cluster", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"state folder (default {DEFAULT_ROOT})")
    parser.add_argument("--no-images", action="store_true", help="do not build or import kiln's images")
    args = parser.parse_args(argv)
    cluster = Cluster(args.root, detached=True)
    if args.command == "status":
        up = (args.root / STATE_FILE).exists()
        print(f"kiln cluster {'up' if up else 'down'} (state: {args.root / STATE_FILE})")
        return 0 if up else 1
    if args.command == "down":
        cluster.down()
        print("kiln cluster down: processes stopped, bridge, rules, mounts, cgroups and sysctls restored")
        return 0
    if (args.root / STATE_FILE).exists():
        print(f"a kiln cluster is already up (state: {args.root / STATE_FILE}); run `make cluster-down` first")
        return 1
    try:
        cluster.up(with_images=not args.no_images)
    except (RuntimeError, LookupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in cluster.timings.items())
    print(f"kiln cluster up: node kiln-node Ready ({timings}); logs in {args.root}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
