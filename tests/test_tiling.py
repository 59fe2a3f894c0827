"""The one embed-and-score loop: any scorer through any window source, one result type."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from swssl.scoring.bank import MemoryBank
from swssl.config import load_preset
from swssl.windows.embed import embed_image
from swssl.errors import ConfigError
from swssl.model.encoder import build_encoder
from swssl.data.readers import open_image
from swssl.scoring.scorers import AlignedScorer, GlobalScorer, ReferenceScorer
from swssl.windows.stream import SlideStream
from swssl.windows.tiling import Chunk, ImageScore, ImageWindows, score_source


def config_for(mode: str):
    return load_preset("small").override({"geometry": {"height": 128, "width": 96, "patch": 32, "step": 32 if mode ==
                                                      "dense" else 16, "mode": mode},
                                         "preprocess": {"foreground_threshold": 0.05}})


def texture(seed: int, shape=(128, 96)) -> np.ndarray:
    """Texture with a dark (background) band, so some windows are not foreground."""
    image = np.random.default_rng(seed).random(shape).astype(np.float32)
    image[:40] = 0.0
    return image


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder(config_for("exact")).eval()


def bank_for(encoder, config) -> MemoryBank:
    embedded = [embed_image(encoder, texture(10 + i), config) for i in range(2)]
    return MemoryBank(torch.stack([e for e, _ in embedded]), torch.stack([f for _, f in embedded]), config, "test",
                      ["a", "b"])


class ChunkRecorder:
    """A scorer written against the interface alone: it scores each window by its embedding's norm."""

    needs = "windows"
    grid = None
    device = torch.device("cpu")

    def __init__(self):
        self.chunks: list[Chunk] = []

    def start(self, grid):
        recorder = self

        class Accumulator:
            def __init__(self):
                self.map = torch.full(grid, float("nan"))

            def update(self, chunk):
                recorder.chunks.append(chunk)
                chosen = chunk.foreground
                if chosen is None:  # every window of the chunk is foreground
                    chosen = torch.ones_like(chunk.rows, dtype=torch.bool)
                self.map[chunk.rows[chosen], chunk.cols[chosen]] = chunk.embeddings[chosen].norm(dim=1)

            def finalize(self, foreground):
                values = self.map[foreground]
                return ImageScore(float(values.max()), self.map.numpy(), foreground.numpy())

        return Accumulator()


@pytest.mark.parametrize("mode", ["exact", "dense"])
def test_every_scorer_in_one_pass_equals_each_alone_in_memory_and_streamed(tmp_path, encoder, mode):
    config = config_for(mode)
    bank = bank_for(encoder, config)
    scorers = {"aligned": AlignedScorer(bank, radius=1), "global": GlobalScorer(bank, k=2),
               "reference": ReferenceScorer(bank), "norm": ChunkRecorder()}
    image = texture(3)
    np.save(tmp_path / "slide.npy", image)
    calls = []
    together = score_source(ImageWindows(image, config, batch_size=8), encoder, scorers, progress=calls.append)
    embeddings, foreground = embed_image(encoder, image, config, 8)
    assert calls and calls[-1] == int(foreground.sum())
    with open_image(tmp_path / "slide.npy") as reader:
        streamed = score_source(SlideStream(reader, 0, config, batch_size=8), encoder, scorers)
    for name, scorer in scorers.items():
        alone = score_source(ImageWindows(image, config, batch_size=8), encoder, {name: scorer})[name]
        for result in (together[name], streamed[name]):
            assert result.score == pytest.approx(alone.score, rel=1e-5)
            np.testing.assert_array_equal(result.foreground, foreground.numpy())
            if alone.window_scores is None:
                assert result.window_scores is None
            else:
                np.testing.assert_allclose(result.window_scores, alone.window_scores, rtol=1e-4, equal_nan=True)
            assert result.windows.shape == foreground.shape and result.seconds > 0
            assert result.scored == int(foreground.sum()) and result.skipped == foreground.numel() - result.scored
    expected = {name: scorer.score(embeddings, foreground) for name, scorer in scorers.items() if name != "norm"}
    for name, result in expected.items():
        assert together[name].score == pytest.approx(result.score, rel=1e-6)


def test_a_windows_scorer_alone_is_handed_only_foreground_windows_in_batches(tmp_path, encoder):
    """Streamed in exact mode, a per-window scorer sees batches of foreground windows as they are encoded."""
    config = config_for("exact")
    image = texture(4)
    np.save(tmp_path / "slide.npy", image)
    recorder = ChunkRecorder()
    with open_image(tmp_path / "slide.npy") as reader:
        result = score_source(SlideStream(reader, 0, config, batch_size=5), encoder, {"norm": recorder})["norm"]
    sizes = [len(chunk.rows) for chunk in recorder.chunks]
    assert all(chunk.foreground is None or chunk.foreground.all() for chunk in recorder.chunks)
    assert sizes[:-1] == [5] * (len(sizes) - 1) and sum(sizes) == result.scored > 0


def test_a_grid_scorer_on_another_grid_is_refused_before_any_pixel_is_read(tmp_path, encoder):
    config = config_for("exact")
    bank = bank_for(encoder, config)
    np.save(tmp_path / "bigger.npy", texture(5, (200, 96)))

    class Unreadable(SlideStream):
        def chunks(self, encode, every_window):
            raise AssertionError("read before the grid was checked")

    with open_image(tmp_path / "bigger.npy") as reader, pytest.raises(ConfigError, match="needs the run's"):
        score_source(Unreadable(reader, 0, config), encoder, {"aligned": AlignedScorer(bank)})
