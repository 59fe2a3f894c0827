"""The encoder batch probe (swssl.inference.batch_probe): the fastest measured batch, the smallest within the
tolerance, the backend's limit respected; checked with a simulated encoder on a simulated clock."""
import pytest
import torch

from swssl.inference import batch_probe
from swssl.inference.batch_probe import choose_batch, probe_batch


class SimulatedEncoder:
    """Costs `seconds(batch)` of simulated time per call (a fixed overhead plus a per-window cost that grows
    once the batch leaves the cache), and records the batch sizes it was called with."""

    def __init__(self, clock, seconds, max_batch=None):
        self.clock, self.seconds, self.max_batch, self.calls = clock, seconds, max_batch, []
        self.device = torch.device("cpu")

    def __call__(self, windows):
        self.calls.append(len(windows))
        self.clock.now += self.seconds(len(windows))
        return torch.zeros(len(windows), 8)


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(batch_probe.time, "perf_counter", fake)
    return fake


def cache_bound(batch):  # 10 ms per call, 1 ms per window up to 64, 2 ms per window beyond
    return 0.01 + 0.001 * min(batch, 64) + 0.002 * max(0, batch - 64)


def test_the_fastest_batch_is_chosen_and_the_rates_are_the_measured_ones(clock):
    encoder = SimulatedEncoder(clock, cache_bound)
    choice = probe_batch(encoder, 32, torch.device("cpu"))
    assert choice.batch == 64 and choice.how == "probed"
    assert list(choice.rates) == list(batch_probe.CANDIDATES["cpu"])
    for size, rate in choice.rates.items():
        assert rate == pytest.approx(size / cache_bound(size))
    assert set(encoder.calls) == set(batch_probe.CANDIDATES["cpu"])
    assert "64 windows per encoder call (probed" in choice.describe()


def test_a_smaller_batch_within_the_tolerance_wins_and_max_batch_caps(clock):
    flat = SimulatedEncoder(clock, lambda batch: 0.001 * batch * (1 - 0.0001 * batch))  # 2.5 % faster at 256
    assert probe_batch(flat, 32, torch.device("cpu")).batch == 16
    capped = SimulatedEncoder(clock, cache_bound, max_batch=32)
    choice = choose_batch(None, capped, "exact", 32, torch.device("cpu"))
    assert max(capped.calls) == 32 and choice.batch == 32 and set(choice.rates) == {16, 32}


def test_a_given_batch_or_dense_mode_is_not_probed(clock):
    encoder = SimulatedEncoder(clock, cache_bound)
    assert choose_batch(48, encoder, "exact", 32, torch.device("cpu")).describe().startswith("48 windows")
    assert choose_batch(None, encoder, "dense", 32, torch.device("cpu")).how == "dense"
    assert encoder.calls == []
