"""Invariants of the SWSSL training triplets (swssl.training.triplets), checked on many draws."""
import numpy as np
import pytest
import torch

from swssl.config import load_preset
from swssl.windows.geometry import grid, window_starts
from swssl.training.triplets import WindowTriplets, neighbour_target


def test_window_starts_policies():
    assert window_starts(1024, 128, 32, "reference").tolist() == list(range(0, 28 * 32, 32))
    cover = window_starts(1000, 128, 32, "cover")
    assert cover[0] == 0 and cover[-1] == 1000 - 128 and np.all(np.diff(cover) > 0)
    assert len(window_starts(768, 128, 32, "cover")) == 21
    with pytest.raises(ValueError):
        window_starts(100, 128, 32)


@pytest.mark.parametrize("d_row,d_col,expected", [(0, 1, 0.75), (1, 1, 0.5), (2, 0, 0.5 / 3 + 0.5),
                                                  (3, 0, 0.5), (3, 3, 0.0), (-2, 3, 0.5 / 3)])
def test_neighbour_target_formula(d_row, d_col, expected):
    assert neighbour_target(torch.tensor(d_row), torch.tensor(d_col)).item() == pytest.approx(expected)


def _sparse_image(rng):
    """Mostly empty (zero) image with foreground islands, so emptiness matters."""
    image = np.zeros((1024, 768), np.float32)
    image[100:600, 0:300] = rng.random((500, 300))
    image[700:740, 500:540] = 0.7  # a small island: only windows overlapping it are non-empty
    return image


NO_AUGMENT = {"augment": {"jitter_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0, "crop_scale": [1.0, 1.0]}}


def test_sampler_invariants():
    config = load_preset("dbt").override(NO_AUGMENT)
    rng = np.random.default_rng(0)
    image = _sparse_image(rng)
    dataset = WindowTriplets([lambda: image], ["sparse"], config)
    rows, cols = grid(config.geometry)
    p = config.geometry.patch
    torch.manual_seed(0)
    for _ in range(200):
        view1, view2, neighbour, target = dataset[0]
        assert view1.shape == view2.shape == neighbour.shape == (1, p, p)
        # The neighbour is an exact, un-augmented window of the image: find where it lies.
        matches = [(r, c) for r, y in enumerate(rows) for c, x in enumerate(cols)
                   if np.array_equal(image[y:y + p, x:x + p], neighbour[0].numpy())]
        assert matches, "neighbour is not a grid window of the image"
        assert neighbour.max() > 0, "neighbour window is empty"
        assert view1.max() > 0, "anchor window is empty"
        assert 0.0 <= target.item() <= 1.0


def test_sampler_neighbour_offsets_within_range():
    """Recover anchor and neighbour positions on an image whose windows are all distinct."""
    config = load_preset("dbt").override(NO_AUGMENT)
    rows, cols = grid(config.geometry)
    image = np.zeros((1024, 768), np.float32)
    # Encode each window's grid position in its top-left pixel block; keep values > 0 everywhere.
    for r, y in enumerate(rows):
        for c, x in enumerate(cols):
            image[y:y + 32, x:x + 32] = (1 + r * len(cols) + c) / (len(rows) * len(cols) + 1)
    dataset = WindowTriplets([lambda: image], ["coded"], config)
    torch.manual_seed(1)
    code = lambda w: int(round(w[0, 0, 0].item() * (len(rows) * len(cols) + 1))) - 1  # noqa: E731
    seen = set()
    for _ in range(300):
        view1, view2, neighbour, target = dataset[0]
        a, n = code(view1), code(neighbour)
        ar, ac, nr, nc = a // len(cols), a % len(cols), n // len(cols), n % len(cols)
        assert (ar, ac) != (nr, nc)
        assert abs(ar - nr) <= 3 and abs(ac - nc) <= 3
        assert target.item() == pytest.approx(neighbour_target(torch.tensor(nr - ar), torch.tensor(nc - ac)).item())
        # view 2 is the inverted window (no augmentation configured)
        assert torch.allclose(view2, 1 - view1, atol=1e-6)
        seen.add((nr - ar, nc - ac))
    assert len(seen) > 20  # many different offsets are drawn


def test_empty_image_is_refused():
    from swssl.errors import DatasetError
    dataset = WindowTriplets([lambda: np.zeros((1024, 768), np.float32)], ["blank.png"], load_preset("dbt"))
    with pytest.raises(DatasetError, match="blank.png"):
        dataset[0]
