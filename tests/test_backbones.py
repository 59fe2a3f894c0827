"""Backbone specs: what each declares is what its trunk does, and torchvision's names and weights fit it."""
import pytest
import torch
import torchvision

from swssl.model.backbones import BACKBONES, backbone_spec
from swssl.config import TRUNK_STRIDE, load_preset
from swssl.errors import ConfigError, WeightsError

SIDE = 64  # px: 2 x 2 cells at stride 32


@pytest.mark.parametrize("name", BACKBONES)
def test_dim_and_stride_are_the_trunks_own(name):
    """A real forward pass: the output has `dim` channels and one cell per `stride` px."""
    spec = backbone_spec(name)
    torch.manual_seed(0)
    with torch.no_grad():
        cells = spec.build_trunk().eval()(torch.rand(1, 3, SIDE, 2 * SIDE))
    assert cells.shape[1] == spec.dim
    assert (SIDE // cells.shape[2], 2 * SIDE // cells.shape[3]) == (spec.stride, spec.stride)
    assert spec.receptive_field.stride == spec.stride


@pytest.mark.parametrize("name", BACKBONES)
def test_torchvision_state_dicts_fit_the_trunk_once_the_classifier_is_dropped(name):
    """The trunk keeps torchvision's parameter names; the classifier prefixes cover every other key."""
    spec = backbone_spec(name)
    with torch.device("meta"):
        full = torchvision.models.get_model(name, weights=None).state_dict()
        trunk = spec.build_trunk().state_dict()
    assert {k for k in full if not k.startswith(spec.classifier)} == set(trunk)
    assert any(k.startswith(spec.classifier) for k in full)
    assert spec.imagenet_weights() in torchvision.models.get_model_weights(name)


def test_every_stride_is_the_trunk_stride_constant():
    """swssl.config.TRUNK_STRIDE stands in for the spec's stride in modules not yet routed through the
    spec (geometry, stream, backends, export/graph): a backbone of another stride must route them first."""
    assert {spec.stride for spec in BACKBONES.values()} == {TRUNK_STRIDE}


def test_halo_per_backbone():
    """From each trunk's structure (tests/test_dense.py checks fields against input gradients)."""
    halos = {name: spec.halo for name, spec in BACKBONES.items()}
    assert halos == {"wide_resnet50_2": 224, "resnet50": 224, "resnet18": 224, "mobilenet_v2": 256}


def test_an_unknown_backbone_is_refused_naming_the_choices():
    with pytest.raises(WeightsError, match="unknown backbone 'vgg16'; choose from wide_resnet50_2, .*mobilenet_v2"):
        backbone_spec("vgg16")
    with pytest.raises(ConfigError, match="model.backbone must be one of .*resnet18.*, not 'vgg16'"):
        load_preset("demo").override({"model": {"backbone": "vgg16"}}).validate()
