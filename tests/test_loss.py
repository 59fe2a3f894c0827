"""The SWSSL loss against an independent float64 numpy computation of the official formula."""
import numpy as np
import pytest
import torch

from swssl.training.loss import swssl_loss


def numpy_loss(z1, z2, zn, target, w, similarity="sigmoid"):
    b, d = z1.shape
    s1 = (z1 - z1.mean(0)) / z1.std(0, ddof=1)
    s2 = (z2 - z2.mean(0)) / z2.std(0, ddof=1)
    c = s1.T @ s2 / b
    twin = sum((c[i, i] - 1) ** 2 for i in range(d)) + w * sum(
        c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)

    def sig_cos(a, x):
        cos = (a * x).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(x, axis=1))
        return 1 / (1 + np.exp(-cos)) if similarity == "sigmoid" else (1 + cos) / 2

    pair = np.abs(sig_cos(z1, z2) - 1).sum()
    neighbour = np.abs(sig_cos(z1, zn) - target).sum()
    return twin, pair, neighbour


@pytest.mark.parametrize("similarity", ["sigmoid", "rescaled"])
@pytest.mark.parametrize("batch,dim,weight", [(2, 3, 1e-6), (7, 16, 1e-6), (32, 24, 0.5)])
def test_loss_matches_float64_reference(batch, dim, weight, similarity):
    rng = np.random.default_rng(batch * dim)
    z1, z2, zn = (rng.normal(size=(batch, dim)) for _ in range(3))
    target = rng.choice([0.0, 0.25, 0.5, 0.75], size=batch)
    twin, pair, neighbour = numpy_loss(z1, z2, zn, target, weight, similarity)
    got = swssl_loss(*(torch.tensor(a, dtype=torch.float32) for a in (z1, z2, zn, target)), offdiag_weight=weight,
                     similarity=similarity)
    assert got.twin.item() == pytest.approx(twin, rel=1e-4)
    assert got.pair.item() == pytest.approx(pair, rel=1e-5)
    assert got.neighbour.item() == pytest.approx(neighbour, rel=1e-5)
    assert got.total.item() == pytest.approx(twin + pair + neighbour, rel=1e-4)


def test_offdiagonal_weight_matters():
    """The off-diagonal term is present (a weight of 0 changes the loss when views are correlated)."""
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(16, 8)), dtype=torch.float32)
    z2 = z + 0.1 * torch.randn_like(z)
    assert swssl_loss(z, z2, z, torch.zeros(16), 1.0).twin > swssl_loss(z, z2, z, torch.zeros(16), 0.0).twin


def test_pair_term_has_the_sigmoid_floor():
    """Identical views still cost |sigmoid(1) - 1| = 0.269 per window (REFERENCE.md)."""
    z = torch.randn(10, 5)
    assert swssl_loss(z, z, z, torch.zeros(10)).pair.item() == pytest.approx(10 * (1 - 1 / (1 + np.exp(-1))), rel=1e-5)


def test_rescaled_similarity_has_no_floor_and_reaches_every_target():
    """The remedy: identical views cost nothing, and a neighbour as similar as its 0.75 target costs nothing."""
    z = torch.randn(10, 5)
    assert swssl_loss(z, z, z, torch.full((10,), 1.0), similarity="rescaled").pair.item() == pytest.approx(0, abs=1e-6)
    cos = 0.5  # (1 + 0.5) / 2 = 0.75
    zn = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([cos, (1 - cos * cos) ** 0.5])])
    z1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    neighbour = swssl_loss(z1, z1, zn, torch.tensor([1.0, 0.75]), similarity="rescaled").neighbour.item()
    assert neighbour == pytest.approx(0, abs=1e-6)
    assert swssl_loss(z1, z1, zn, torch.tensor([1.0, 0.75])).neighbour.item() > 0.2  # the sigmoid cannot
