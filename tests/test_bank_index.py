"""The FAISS bank index (flat, ivf) against an independent float64 numpy brute force; its scorer option."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from swssl.errors import ConfigError, SwsslError
from swssl.files import sha256_file
from swssl.scoring import bank_index
from swssl.scoring.bank import MemoryBank
from swssl.scoring.bank_index import IVF_NPROBE, BankIndex, ivf_lists
from swssl.scoring.calibration import options_key
from swssl.scoring.evaluate import report_name
from swssl.scoring.scorers import build_scorer, global_rows, save_global_index
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


def clustered(n, dim=64, centres=40, seed=0):
    """Non-negative clustered rows (as post-ReLU embeddings), and 300 queries: 270 rows + noise, 30 far-off."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    bank = np.maximum(c[rng.integers(centres, size=n)] + 0.3 * rng.normal(size=(n, dim)), 0)
    near = np.maximum(bank[rng.choice(n, 270, replace=False)] + 0.1 * rng.normal(size=(270, dim)), 0)
    far = np.maximum(1.5 * rng.normal(size=(30, dim)), 0)
    return bank, np.concatenate([near, far])


@needs_faiss
def test_ivf_recall_at_1_with_the_chosen_parameters():
    bank, queries = clustered(10_000)
    index = BankIndex(torch.tensor(bank, dtype=torch.float32), "ivf")
    assert index.lists == ivf_lists(10_000) and index.nprobe == IVF_NPROBE
    got = index.search(torch.tensor(queries, dtype=torch.float32), 1)[:, 0].numpy()
    # float64 expansion (np_knn's differences would take 300 x 10k x 64 doubles)
    exact = np.sqrt(np.maximum((queries ** 2).sum(1)[:, None] + (bank ** 2).sum(1)[None] - 2 * queries @ bank.T,
                               0)).min(1)
    assert np.isclose(got, exact, rtol=1e-4).mean() >= 0.99
    assert (got >= exact * (1 - 1e-4)).all()  # never nearer than the truth: an approximate miss only overestimates


def saved_bank(tmp_path, n=12, seed=0):
    bank, _, _ = random_bank(n, 6, 5, 17, seed=seed)
    bank.save(tmp_path / "bank.safetensors")
    return MemoryBank.load(tmp_path / "bank.safetensors")


@needs_faiss
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_saved_index_round_trips_and_gives_the_same_scores(tmp_path, kind):
    bank = saved_bank(tmp_path)
    options = {"k": 2, "coreset_ratio": 0.5, "index": kind}
    path = save_global_index(bank, options)
    assert path == tmp_path / f"bank.index-{kind}.faiss" and path.is_file()
    assert (tmp_path / f"bank.index-{kind}.json").is_file()
    scorer = build_scorer("global", bank, **options)
    assert scorer.index_source == f"saved index {path}"
    built = BankIndex(global_rows(bank, 2, 0.5), kind)
    test, fg = random_image(6, 5, 17)
    queries = torch.tensor(test[fg], dtype=torch.float32)
    assert torch.allclose(scorer.index.search(queries, 2), built.search(queries, 2))
    expected = np_knn(test[fg], global_rows(bank, 2, 0.5).double().numpy(), 2).mean(-1)
    if kind == "flat":
        assert np.allclose(scorer.score(torch.tensor(test), torch.tensor(fg)).window_scores[fg], expected, rtol=1e-4)


@needs_faiss
def test_a_mismatched_or_damaged_saved_index_is_not_used(tmp_path):
    bank = saved_bank(tmp_path)
    path = save_global_index(bank, {"coreset_ratio": 0.5, "index": "flat"})
    # other settings: another coreset ratio or seed holds other rows
    assert build_scorer("global", bank, coreset_ratio=0.4, index="flat").index_source.endswith("differ)")
    assert "coreset_seed" in build_scorer("global", bank, coreset_ratio=0.5, seed=1, index="flat").index_source
    # another bank at the same place (its sha256 differs)
    other = saved_bank(tmp_path / "other", seed=5)
    (tmp_path / "other" / "bank.index-flat.faiss").write_bytes(path.read_bytes())
    (tmp_path / "other" / "bank.index-flat.json").write_bytes((tmp_path / "bank.index-flat.json").read_bytes())
    assert "bank_sha256" in build_scorer("global", other, coreset_ratio=0.5, index="flat").index_source
    # damaged bytes: the digest catches them, the index is rebuilt and scores stay exact
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    scorer = build_scorer("global", bank, coreset_ratio=0.5, index="flat")
    assert "damaged" in scorer.index_source
    test, fg = random_image(6, 5, 17)
    expected = np_knn(test[fg], global_rows(bank, 1, 0.5).double().numpy(), 1).mean(-1)
    assert np.allclose(scorer.score(torch.tensor(test), torch.tensor(fg)).window_scores[fg], expected, rtol=1e-4)


@needs_faiss
def test_an_unreadable_index_with_a_matching_digest_is_a_clear_error(tmp_path):
    bank = saved_bank(tmp_path)
    path = save_global_index(bank, {"index": "flat"})
    path.write_bytes(b"not a faiss index")
    meta = tmp_path / "bank.index-flat.json"
    saved = json.loads(meta.read_text())
    saved["index_sha256"] = sha256_file(path)
    meta.write_text(json.dumps(saved))
    with pytest.raises(SwsslError, match=r"bank.index-flat.faiss: FAISS cannot read this index"):
        build_scorer("global", bank, index="flat")


@needs_faiss
def test_the_automatic_choice_switches_at_the_crossover(monkeypatch, tmp_path):
    bank = saved_bank(tmp_path)  # 12 x 6 x 5 windows, about 80 % foreground: ~290 rows
    rows = len(global_rows(bank))
    monkeypatch.setattr(bank_index, "AUTO_INDEX_ROWS", rows + 1)
    below = build_scorer("global", bank)
    assert below.index is None and below.search == "brute force"
    assert save_global_index(bank, {}) is None
    monkeypatch.setattr(bank_index, "AUTO_INDEX_ROWS", rows)
    above = build_scorer("global", bank)
    assert above.index.kind == "ivf" and above.search.startswith("ivf nlist")
    assert save_global_index(bank, {}) == tmp_path / "bank.index-ivf.faiss"
    assert build_scorer("global", bank).index_source.startswith("saved index")
    monkeypatch.setitem(sys.modules, "faiss", None)  # without faiss the automatic choice is the brute force
    assert build_scorer("global", bank).search == "brute force"


def test_the_index_is_named_in_report_folders_and_shares_the_brute_force_calibration():
    options = {"k": 1, "top": 1, "coreset_ratio": None, "index": "ivf"}
    assert report_name("test", "global", options) == "test-global-indexivf"
    assert report_name("test", "global", {**options, "k": 3, "coreset_ratio": 0.1, "index": "flat"}, 25) == \
        "test-global-k3-coreset0.1-indexflat-n25"
    assert report_name("test", "global", {**options, "index": None}) == "test-global"
    assert options_key("global", {"k": 1, "index": None}) == options_key("global", {"k": 1})
    assert options_key("global", {"k": 1, "index": "ivf"}) == options_key("global", {"k": 1})


def test_without_faiss_the_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    bank, _, _ = random_bank(2, 2, 2, 4)
    with pytest.raises(ConfigError, match="pip install faiss-cpu"):
        build_scorer("global", bank, index="flat")


def test_an_unknown_index_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="choose from flat, ivf"):
        BankIndex(torch.zeros(3, 4), "hnsw")


@needs_faiss
def test_swssl_bank_builds_the_coreset_and_index_once_and_saves_that_index(tiny_data, tmp_path, monkeypatch):
    """The calibration's global scorer builds them; swssl-bank saves its index (no second k-means, no second
    greedy), and a scorer of the saved bank then loads it."""
    from click.testing import CliRunner

    from swssl import cli
    from swssl.config import load_preset
    from swssl.model.checkpoint import save_checkpoint
    from swssl.model.encoder import build_encoder
    from swssl.scoring import scorers

    config = load_preset("small").override({"geometry": {"height": 128, "width": 96, "patch": 32, "step": 16}})
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.pt", build_encoder(config).eval(), None, 0, config, [])
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    counts = {"index": 0, "coreset": 0}
    index_init, greedy = BankIndex.__init__, scorers.k_center_greedy

    def counted_index(self, *args, **kwargs):
        counts["index"] += 1
        index_init(self, *args, **kwargs)

    def counted_greedy(*args, **kwargs):
        counts["coreset"] += 1
        return greedy(*args, **kwargs)

    monkeypatch.setattr(BankIndex, "__init__", counted_index)
    monkeypatch.setattr(scorers, "k_center_greedy", counted_greedy)
    result = CliRunner().invoke(cli.bank, [str(run), "--data", str(tiny_data), "--device", "cpu", "--batch", "16",
                                           "--index", "flat", "--coreset", "0.5"])
    assert result.exit_code == 0, result.output
    assert counts == {"index": 1, "coreset": 1} and "bank index: " in result.output
    bank = MemoryBank.load(run)
    scorer = build_scorer("global", bank, coreset_ratio=0.5, index="flat")
    assert scorer.index_source.startswith("saved index")
