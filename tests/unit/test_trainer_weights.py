"""Named torchvision weights (model.weights: IMAGENET1K_V1) from the cache, the weights volume or a mirror
on loopback (never the internet), their normalisation, and the CIFAR stem for ResNets."""

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import trainer_support as support

from kiln_trainer import data, errors, models

ARCH, NAME, FILE = "squeezenet1_1", "IMAGENET1K_V1", "squeezenet1_1-b8a52dc0.pth"


@contextlib.contextmanager
def serve_file(body: bytes) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering every GET with ``body``; yields its URL and the paths asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mirror", asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache of the test's own."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _state_dict_bytes(tmp_path: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = torchvision.models.get_model(ARCH, weights=None, num_classes=1000).state_dict()
    path = tmp_path / "generated.pth"
    torch.save(state, path)
    return path.read_bytes(), state


def test_named_weights_are_refused_when_missing_and_downloading_is_not_allowed(torch_home: Path) -> None:
    spec = support.spec(model={"architecture": ARCH, "weights": NAME})
    with pytest.raises(errors.ConfigError, match=f"{FILE}.*allowDownload"):
        models.build_model(spec, 10)


def test_named_weights_download_from_the_mirror_once_then_load_from_the_cache(torch_home: Path, tmp_path: Path) -> None:
    body, state = _state_dict_bytes(tmp_path)
    with serve_file(body) as (mirror, asked):
        spec = support.spec(
            model={
                "architecture": ARCH,
                "weights": f"SqueezeNet1_1_Weights.{NAME}",
                "allowDownload": True,
                "weightsMirror": mirror,
            }
        )
        model = models.build_model(spec, 10)
        assert asked == [f"/mirror/{FILE}"]
    assert (torch_home / FILE).read_bytes() == body
    torch.testing.assert_close(model.state_dict()["features.0.weight"], state["features.0.weight"])
    # The classifier has 10 outputs, not ImageNet's 1000: re-initialised for fine-tuning.
    assert model.state_dict()["classifier.1.weight"].shape[0] == 10
    again = models.build_model(support.spec(model={"architecture": ARCH, "weights": NAME}), 10)  # server gone
    torch.testing.assert_close(again.state_dict()["features.0.weight"], state["features.0.weight"])


def test_unknown_weight_names_list_the_known_ones() -> None:
    with pytest.raises(errors.ConfigError, match="IMAGENET1K_V1"):
        models.build_model(support.spec(model={"architecture": ARCH, "weights": "IMAGENET9K_V9"}), 10)


def test_named_weights_bring_their_own_normalisation_unless_the_spec_sets_one() -> None:
    bundle = data.load_data(support.spec(model={"architecture": ARCH, "weights": NAME}, data={"maxSamples": 50}))
    assert bundle.mean == pytest.approx([0.485, 0.456, 0.406]) and bundle.std == pytest.approx([0.229, 0.224, 0.225])
    own = support.spec(
        model={"architecture": ARCH, "weights": NAME},
        data={"maxSamples": 50, "normalize": {"mean": [0.1], "std": [0.2]}},
    )
    assert data.load_data(own).mean == [0.1] * 3


def test_the_cifar_stem_keeps_a_4x4_map_in_the_last_resnet_stage() -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    for stem in ("imagenet", "cifar"):
        model = models.build_model(support.spec(model={"architecture": "resnet18", "stem": stem}), 10).eval()
        model.layer4.register_forward_hook(lambda m, i, o, stem=stem: shapes.__setitem__(stem, tuple(o.shape)))
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
    assert shapes == {"imagenet": (1, 512, 1, 1), "cifar": (1, 512, 4, 4)}


def test_the_cifar_stem_is_refused_for_networks_that_are_not_resnets() -> None:
    with pytest.raises(errors.ConfigError, match="model.stem"):
        models.build_model(support.spec(model={"stem": "cifar"}), 10)
