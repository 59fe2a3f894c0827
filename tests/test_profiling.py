"""The stage clock (swssl.profiling): exclusive times per stage, and swssl-infer --profile on real slides."""
import json
import threading

import pytest

from swssl import profiling
from test_infer import invoke, tiny  # noqa: F401 (the fixture)


class FakeTime:
    """perf_counter for the clock: advances only when told, so the accounting is checked exactly."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_nested_stages_are_exclusive_and_each_thread_has_its_own(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(profiling.time, "perf_counter", fake)
    with profiling.profiling() as clock:
        with profiling.stage(profiling.FRAME):
            fake.now += 1.0
            with profiling.stage("resize"):
                fake.now += 2.0
                with profiling.stage("read"):
                    fake.now += 4.0
            with profiling.stage("embed"):
                fake.now += 8.0
            # another thread's stage while this one waits: its own, not nested in (subtracted from) the frame

            def prefetch():
                with profiling.stage("read" + profiling.PREFETCH):
                    fake.now += 16.0

            worker = threading.Thread(target=prefetch)
            worker.start()
            worker.join()
    assert clock.seconds == {"read": 4.0, "resize": 2.0, "embed": 8.0, "read" + profiling.PREFETCH: 16.0,
                             profiling.FRAME: 17.0}
    stages = clock.to_dict()["stages"]
    assert clock.frames == 1 and stages["other"]["seconds"] == 17.0
    assert stages["embed"]["share"] == pytest.approx(8 / 31, abs=1e-4)  # of the main thread's 31 s
    assert stages["embed"]["ms_per_frame"] == 8000.0
    assert stages["read" + profiling.PREFETCH]["share"] is None


def test_stages_cost_nothing_and_record_nothing_without_a_clock():
    assert not profiling.enabled()
    with profiling.stage("embed"):
        pass
    with profiling.profiling():
        with pytest.raises(RuntimeError):
            with profiling.profiling():
                pass
    assert not profiling.enabled()


@pytest.mark.parametrize("scale", [None, "1"])
def test_infer_profile_times_every_stage_of_each_slide(tiny, tmp_path, scale):  # noqa: F811
    root, run = tiny
    out = tmp_path / "out"
    extra = [] if scale is None else ["--scale", scale]
    result = invoke(root / "test-0.png", root / "test-1.png", "--model", run, "--out", out, "--profile", *extra)
    assert result.exit_code == 0, result.output
    profile = json.loads((out / "profile.json").read_text())
    assert profile["frames"] == 2
    stages = profile["stages"]
    expected = {"embed", "score", "windows", "write", "other"}
    expected |= {"read", "resize"} if scale is None else {"read" + profiling.PREFETCH, "upload", "wait"}
    assert expected <= set(stages)
    shares = [row["share"] for row in stages.values() if row["share"] is not None]
    assert sum(shares) == pytest.approx(1, abs=1e-3)
    assert all(row["seconds"] >= 0 for row in stages.values())
    assert "time per stage over 2 frame(s)" in result.output and "embed" in result.output


def test_profile_does_not_go_with_ray(tiny, tmp_path):  # noqa: F811
    root, run = tiny
    result = invoke(root / "test-0.png", "--model", run, "--out", tmp_path / "out", "--profile", "--ray")
    assert result.exit_code == 2 and "--profile" in result.output
