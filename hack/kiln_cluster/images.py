"""Images for a node with no registry: the pause image written here as an OCI archive, kiln's images built by
hack/build-images.sh, both imported into containerd's `k8s.io` namespace (the one kubelet's CRI uses).

Pods refer to images by the chart's names (`kiln-serving:0.1.0`), which containerd resolves as
`docker.io/library/kiln-serving:0.1.0`: build-images.sh tags them so, and the chart's pull policy
(IfNotPresent) never asks a registry for an image that is present.
"""

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "hack" / "build-images.sh"
NAMESPACE = "k8s.io"
PAUSE_IMAGE = "docker.io/kiln/pause:1"
KILN_IMAGES = ("operator", "trainer", "serving")


def _ctr(bins: dict[str, Path], socket: Path, *args: str, timeout: float = 600) -> str:
    argv = [str(bins["ctr"]), "--address", str(socket), "-n", NAMESPACE, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _blob(layout: tarfile.TarFile, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    layout.addfile(info, io.BytesIO(data))
    return {"digest": f"sha256:{digest}", "size": len(data)}


def pause_archive(binary: Path, out: Path, name: str = PAUSE_IMAGE) -> Path:
    """An OCI image archive holding only `binary` as /pause (its entrypoint), named `name`."""
    binary = binary.resolve()  # the binaries folder links to the build cache: the image holds the file itself
    layer_bytes = io.BytesIO()
    with tarfile.open(fileobj=layer_bytes, mode="w") as layer:
        info = layer.gettarinfo(str(binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755
        with binary.open("rb") as content:
            layer.addfile(info, content)
    layer_data = layer_bytes.getvalue()
    diff_id = f"sha256:{hashlib.sha256(layer_data).hexdigest()}"
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, mode="w") as layout:
        layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(layout, layer_data)}
        config_desc = {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(layout, json.dumps(config).encode()),
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }
        manifest_desc = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **_blob(layout, json.dumps(manifest).encode()),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            "platform": {"architecture": "amd64", "os": "linux"},
        }
        for member, data in (
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            ("index.json", json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}).encode()),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            layout.addfile(info, io.BytesIO(data))
    return out


def import_archive(bins: dict[str, Path], socket: Path, archive: Path) -> None:
    """Import an OCI (or docker) archive into containerd and unpack it for the overlayfs snapshotter."""
    _ctr(bins, socket, "images", "import", "--no-unpack=false", "--snapshotter", "overlayfs", str(archive))


def import_pause(bins: dict[str, Path], socket: Path, folder: Path) -> None:
    import_archive(bins, socket, pause_archive(bins["pause"], folder / "pause.tar"))


def build_kiln_images(export_dir: Path, which: tuple[str, ...] = KILN_IMAGES) -> list[Path]:
    """Run hack/build-images.sh for `which` (cached: seconds when nothing changed); the archives it exported."""
    env_images = " ".join(which)
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--export", str(export_dir)],
        env={**os.environ, "KILN_IMAGES": env_images},
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"hack/build-images.sh failed:\n{done.stderr[-4000:]}")
    return [export_dir / f"kiln-{name}.tar" for name in which]


def imported(bins: dict[str, Path], socket: Path) -> set[str]:
    """Names of the images containerd holds."""
    return {line.split()[0] for line in _ctr(bins, socket, "images", "ls", "-q").splitlines() if line.strip()}


def crictl(bins: dict[str, Path], socket: Path) -> list[str]:
    """crictl talking to this node's containerd over the CRI (kubelet's view of pods, containers and images)."""
    return [str(bins["crictl"]), "--runtime-endpoint", f"unix://{socket}", "--timeout", "60s"]


def remove_all_pods(bins: dict[str, Path], socket: Path) -> None:
    """Stop and remove every pod sandbox through the CRI, so the CNI plugins delete their veths and IPs."""
    if not socket.exists():
        return
    subprocess.run([*crictl(bins, socket), "rmp", "--all", "--force"], capture_output=True, timeout=180, check=False)


def remove_untagged(bins: dict[str, Path], socket: Path) -> list[str]:
    """Remove the images no tag points at any more (a rebuilt kiln image leaves its predecessor behind under its
    bare id, ~10 GB for the trainer): without this the node's store grows by one image per rebuild. Returns
    the ids removed; run while no pod uses them (at `up`, before any pod)."""
    cri = crictl(bins, socket)
    listed = subprocess.run([*cri, "images", "-o", "json"], capture_output=True, text=True, timeout=120, check=True)
    stale = [i["id"] for i in json.loads(listed.stdout).get("images") or [] if not i.get("repoTags")]
    for image_id in stale:
        subprocess.run([*cri, "rmi", image_id], capture_output=True, timeout=120, check=False)
    return stale
