"""Backbone specs: what each declares is what its trunk does, and torchvision's names and weights fit it."""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from swssl.config import load_preset
from swssl.data.readers import open_image
from swssl.errors import ConfigError, WeightsError
from swssl.model.backbones import BACKBONES, BackboneSpec, Stage, backbone_spec
from swssl.model.encoder import build_encoder
from swssl.windows.embed import embed_image
from swssl.windows.geometry import canvas_shape, grid
from swssl.windows.stream import SlideStream

SIDE = 64  # px: 2 x 2 cells at stride 32


@pytest.mark.parametrize("name", BACKBONES)
def test_each_stage_has_the_channels_and_stride_it_declares(name):
    """A real forward pass through every stage: `channels` channels, one cell per `stride` px; the last
    stage is the trunk's output."""
    spec = backbone_spec(name)
    torch.manual_seed(0)
    trunk = spec.build_trunk().eval()
    outputs = {}
    for stage in spec.stages:
        trunk.get_submodule(stage.node).register_forward_hook(
            lambda module, args, out, node=stage.node: outputs.__setitem__(node, out))
    with torch.no_grad():
        cells = trunk(torch.rand(1, 3, SIDE, 2 * SIDE))
    assert outputs[spec.stages[-1].node] is cells
    for stage in spec.stages:
        shape = outputs[stage.node].shape
        assert shape[1] == stage.channels, stage
        assert (SIDE // shape[2], 2 * SIDE // shape[3]) == (stage.stride, stage.stride), stage
        assert spec.layout((spec.stages.index(stage) + 1,)).receptive_field.stride == stage.stride
    assert [s.stride for s in spec.stages] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", BACKBONES)
def test_torchvision_state_dicts_fit_the_trunk(name):
    """The trunk keeps torchvision's parameter names: every trunk tensor is in torchvision's state dict, and
    what is left over is the classifier."""
    spec = backbone_spec(name)
    with torch.device("meta"):
        full = torchvision.models.get_model(name, weights=None).state_dict()
        trunk = spec.build_trunk().state_dict()
    assert set(trunk) < set(full)
    assert {key.split(".")[0] for key in set(full) - set(trunk)} == {"fc" if "resnet" in name else "classifier"}
    assert spec.imagenet_weights() in torchvision.models.get_model_weights(name)


def test_a_backbone_of_another_stride_runs_dense_mode_in_memory_and_streamed(tmp_path, monkeypatch):
    """The stride comes from the spec everywhere: a per-pixel trunk pooled over 16 x 16 cells (stride 16,
    halo 0) embeds 32 px windows every 16 px densely, in memory and streamed, as float64 numpy does."""
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.AvgPool2d(16))

    spec = BackboneSpec("per_pixel_16", build, (Stage("3", 5, 16),), "ResNet18_Weights.IMAGENET1K_V1")
    monkeypatch.setitem(BACKBONES, spec.name, spec)
    config = load_preset("small").override({"geometry": {"height": 80, "width": 64, "patch": 32, "step": 16,
                                                        "mode": "dense"},
                                           "model": {"backbone": spec.name, "stages": [1]}}).validate()
    assert config.stride == 16 and config.features.halo == 0
    torch.manual_seed(0)
    encoder = build_encoder(config).eval()
    image = np.random.default_rng(0).random((70, 64)).astype(np.float32)  # 70 rows: padded to the 16 px lattice
    dense, _ = embed_image(encoder, image, config)
    rows, cols = grid(config.geometry, *image.shape)
    canvas = np.zeros(canvas_shape(*image.shape, config.geometry, config.stride))
    canvas[:70] = image
    conv1, conv2 = encoder.trunk.get_submodule("0"), encoder.trunk.get_submodule("2")
    w1, b1 = conv1.weight.detach().double().numpy()[:, :, 0, 0], conv1.bias.detach().double().numpy()
    w2, b2 = conv2.weight.detach().double().numpy()[:, :, 0, 0], conv2.bias.detach().double().numpy()
    x = (canvas[..., None] - encoder.mean.double().numpy().ravel()) / encoder.std.double().numpy().ravel()
    features = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    expected = np.stack([np.stack([features[y:y + 32, c:c + 32].mean((0, 1)) for c in cols]) for y in rows])
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.save(tmp_path / "slide.npy", image)
    with open_image(tmp_path / "slide.npy") as reader:
        chunks = list(SlideStream(reader, 0, config, block_rows=16).chunks(encoder, every_window=True))
    streamed = np.zeros_like(expected)
    for chunk in chunks:
        streamed[chunk.rows.numpy(), chunk.cols.numpy()] = chunk.embeddings.numpy()
    np.testing.assert_allclose(streamed, expected, rtol=1e-5, atol=1e-5)


def test_halo_per_backbone():
    """From each trunk's structure (tests/test_dense.py checks fields against input gradients)."""
    halos = {name: spec.layout().halo for name, spec in BACKBONES.items()}
    assert halos == {"wide_resnet50_2": 224, "resnet50": 224, "resnet18": 224, "mobilenet_v2": 256}


def test_an_unknown_backbone_is_refused_naming_the_choices():
    with pytest.raises(WeightsError, match="unknown backbone 'vgg16'; choose from wide_resnet50_2, .*mobilenet_v2"):
        backbone_spec("vgg16")
    with pytest.raises(ConfigError, match="model.backbone must be one of .*resnet18.*, not 'vgg16'"):
        load_preset("small").override({"model": {"backbone": "vgg16"}}).validate()
