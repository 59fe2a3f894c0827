"""GlobalScorer.score_windows: per-window k-NN distances, the same numbers GlobalScorer.score maps."""
import pytest
import torch

from swssl.scoring.bank import MemoryBank
from swssl.config import Config
from swssl.scoring.scorers import GlobalScorer


def bank_of(embeddings: torch.Tensor, foreground: torch.Tensor) -> MemoryBank:
    return MemoryBank(embeddings, foreground, Config(), "test", [f"img{i}" for i in range(len(embeddings))])


@pytest.mark.parametrize("k, chunk", [(1, 8192), (3, 7)])  # chunk 7: the bank is scanned in several chunks
def test_score_windows_is_the_mean_distance_to_the_k_nearest(k, chunk):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3, 4, 5, 16, generator=generator)
    foreground = torch.rand(3, 4, 5, generator=generator) > 0.3
    scorer = GlobalScorer(bank_of(embeddings, foreground), k=k, chunk=chunk)
    queries = torch.randn(11, 16, generator=generator) * 2
    got = scorer.score_windows(queries)
    reference = torch.cdist(queries.double(), embeddings[foreground].double())  # background is no reference
    expected = reference.topk(k, dim=1, largest=False).values.mean(1)
    assert got.shape == (11,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert scorer.score_windows(torch.zeros(0, 16)).shape == (0,)


def test_score_maps_the_per_window_scores_of_foreground_windows():
    generator = torch.Generator().manual_seed(1)
    bank = bank_of(torch.randn(2, 3, 4, 8, generator=generator), torch.ones(2, 3, 4, dtype=torch.bool))
    scorer = GlobalScorer(bank, k=2, top=2)
    test = torch.randn(3, 4, 8, generator=generator)
    foreground = torch.ones(3, 4, dtype=torch.bool)
    foreground[0, :2] = False
    result = scorer.score(test, foreground)
    alone = scorer.score_windows(test[foreground])
    window_scores = torch.from_numpy(result.window_scores)
    torch.testing.assert_close(window_scores[foreground], alone)
    assert window_scores[~foreground].isnan().all()
    assert result.score == pytest.approx(alone.topk(2).values.mean().item())
