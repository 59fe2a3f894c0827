"""The FAISS bank index (flat, hnsw) against an independent float64 numpy brute force; its scorer option."""
import importlib.util
import sys

import numpy as np
import pytest
import torch

from swssl.errors import ConfigError
from swssl.scoring.bank_index import BankIndex
from swssl.scoring.calibration import options_key
from swssl.scoring.evaluate import report_name
from swssl.scoring.scorers import build_scorer
from test_scorers import random_bank, random_image

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss is not installed (pip install faiss-cpu)")


def np_knn(queries, bank, k):
    """k smallest distances per query, float64, from the differences (not the norm expansion)."""
    distances = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    return np.sort(distances, axis=1)[:, :k]


@needs_faiss
@pytest.mark.parametrize("k", [1, 3, 10])
def test_flat_index_distances_equal_brute_force(k):
    # continuous random rows: ties between distances have probability zero
    rng = np.random.default_rng(k)
    bank, queries = rng.normal(size=(700, 24)), rng.normal(size=(60, 24))
    index = BankIndex(torch.tensor(bank, dtype=torch.float32), "flat")
    got = index.search(torch.tensor(queries, dtype=torch.float32), k)
    assert got.shape == (60, k) and got.dtype == torch.float32
    assert np.allclose(got.numpy(), np_knn(queries, bank, k), rtol=1e-5, atol=1e-5)


@needs_faiss
@pytest.mark.parametrize("coreset_ratio", [None, 0.3])
@pytest.mark.parametrize("k", [1, 4])
def test_global_scorer_with_a_flat_index_equals_brute_force(k, coreset_ratio):
    bank, _, _ = random_bank(9, 6, 5, 17)
    test, fg = random_image(6, 5, 17)
    images = torch.tensor(test), torch.tensor(fg)
    brute = build_scorer("global", bank, k=k, coreset_ratio=coreset_ratio)
    indexed = build_scorer("global", bank, k=k, coreset_ratio=coreset_ratio, index="flat")
    expected = np_knn(test[fg], brute.bank.double().numpy(), k).mean(-1)  # the coreset rows, when there is one
    assert np.allclose(indexed.score(*images).window_scores[fg], expected, rtol=1e-4)
    assert np.allclose(indexed.score(*images).window_scores[fg], brute.score(*images).window_scores[fg], rtol=1e-4)


@needs_faiss
def test_hnsw_recall_at_1():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(20_000, 64))
    queries = bank[rng.choice(len(bank), 500, replace=False)] + rng.normal(scale=0.3, size=(500, 64))
    exact = np.sqrt(((queries ** 2).sum(1)[:, None] + (bank ** 2).sum(1)[None] - 2 * queries @ bank.T)).min(1)
    index = BankIndex(torch.tensor(bank, dtype=torch.float32), "hnsw")
    got = index.search(torch.tensor(queries, dtype=torch.float32), 1)
    recall = np.isclose(got[:, 0].numpy(), exact, rtol=1e-4).mean()
    assert recall >= 0.99


def test_the_index_is_named_in_report_folders_and_shares_the_brute_force_calibration():
    options = {"k": 1, "top": 1, "coreset_ratio": None, "index": "hnsw"}
    assert report_name("test", "global", options) == "test-global-indexhnsw"
    assert report_name("test", "global", {**options, "k": 3, "coreset_ratio": 0.1, "index": "flat"}, 25) == \
        "test-global-k3-coreset0.1-indexflat-n25"
    assert report_name("test", "global", {**options, "index": None}) == "test-global"
    assert options_key("global", {"k": 1, "index": None}) == options_key("global", {"k": 1})
    assert options_key("global", {"k": 1, "index": "hnsw"}) == options_key("global", {"k": 1})


def test_without_faiss_the_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    bank, _, _ = random_bank(2, 2, 2, 4)
    with pytest.raises(ConfigError, match="pip install faiss-cpu"):
        build_scorer("global", bank, index="flat")


def test_an_unknown_index_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="choose from flat, hnsw"):
        BankIndex(torch.zeros(3, 4), "ivf")
