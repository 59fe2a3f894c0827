"""Batched window embedding equals one window at a time; the grid covers the image."""
import numpy as np
import pytest
import torch

from swssl.config import load_preset
from swssl.windows.embed import embed_image
from swssl.windows.geometry import grid
from swssl.model.encoder import build_encoder


def test_default_grid_covers_every_pixel():
    for height, width, patch, step in [(1024, 768, 128, 32), (1000, 777, 128, 32), (300, 200, 64, 24)]:
        config = load_preset("small").override({"geometry": {"height": height, "width": width,
                                                            "patch": patch, "step": step}})
        rows, cols = grid(config.geometry)
        covered = np.zeros((height, width), bool)
        for y in rows:
            for x in cols:
                covered[y:y + patch, x:x + patch] = True
        assert covered.all()


def test_reference_grid_is_the_official_one():
    config = load_preset("dbt").override({"geometry": {"grid": "reference"}})
    rows, cols = grid(config.geometry)
    assert (len(rows), len(cols)) == (28, 20)


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batched_embedding_equals_single_windows(batch_size):
    config = load_preset("small").override({"geometry": {"height": 160, "width": 224, "patch": 64, "step": 24}})
    torch.manual_seed(0)
    encoder = build_encoder(config).eval()
    rng = np.random.default_rng(0)
    image = rng.random((160, 224)).astype(np.float32)
    image[:, :90] = 0  # empty air on the left: those windows are not encoded
    embeddings, foreground = embed_image(encoder, image, config, batch_size=batch_size)
    rows, cols = grid(config.geometry, 160, 224)
    assert embeddings.shape == (len(rows), len(cols), encoder.dim)
    assert not foreground.all() and foreground.any()
    with torch.no_grad():
        for r, y in enumerate(rows):
            for c, x in enumerate(cols):
                window = torch.from_numpy(image[y:y + 64, x:x + 64].copy())[None, None]
                assert bool(foreground[r, c]) == bool(window.max() > 0)
                alone = encoder(window)[0]
                assert torch.allclose(embeddings[r, c], alone, atol=1e-4, rtol=1e-4), (r, c)
