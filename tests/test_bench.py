"""swssl-bench: FLOP counting, the timing helper's statistics, report rendering, and a smoke run.

No test asserts a speed: only that the harness measures what it says and writes a valid report.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from swssl.bench import cli, flops, machine, report, session, timing, workload
from swssl.model.encoder import PatchEncoder

ROOT = Path(__file__).resolve().parents[1]


# --- FLOPs -------------------------------------------------------------------------------------


def test_count_flops_of_known_layers():
    linear = torch.nn.Linear(16, 8, bias=False)
    assert flops.count_flops(linear, torch.rand(4, 16)) == 2 * 4 * 16 * 8  # a multiply-add is 2 FLOPs
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert flops.count_flops(conv, torch.rand(1, 3, 10, 10)) == 2 * (8 * 10 * 10) * (3 * 3 * 3)


def test_flops_per_window_of_resnet18_matches_its_published_cost():
    # resnet18: 1.81 GMAC at 224 px; a 128 px window costs about (128/224)^2 of it, 2 FLOPs per MAC.
    encoder = PatchEncoder("resnet18").train()
    counted = flops.flops_per_window(encoder, 128)
    assert 1.1e9 < counted < 1.3e9
    assert encoder.training  # the mode it came in with is restored


def test_percent_of_peak_and_matmul_peak():
    assert flops.percent_of_peak(2e9, 50.0, 1e12) == pytest.approx(10.0)
    peak = flops.matmul_peak("cpu", "fp32", size=64, warmup=0, repeats=2)
    assert peak["size"] == 64 and peak["repetitions"] >= 2 and peak["flops_per_s"] > 0
    with pytest.raises(ValueError):
        flops.matmul_peak("cpu", "int8", size=8)


# --- timing ------------------------------------------------------------------------------------


def test_percentile_matches_numpy():
    values = [0.3, 0.1, 0.9, 0.5, 0.2, 0.7, 0.4]
    for q in (0, 5, 50, 95, 100):
        assert timing.percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        timing.percentile([], 50)


def test_timing_statistics():
    t = timing.Timing([4.0, 1.0, 2.0, 3.0, 100.0])
    assert t.median == 3.0 and t.mean == 22.0 and t.min == 1.0
    assert t.p95 == pytest.approx(np.percentile(t.samples, 95))
    assert t.rate(6) == 2.0  # items per second at the median: one slow repetition does not move it
    assert t.to_dict()["repetitions"] == 5


class FakeClock:
    """Each call of the measured function takes `step` seconds of this clock."""

    def __init__(self, step: float):
        self.now, self.step, self.calls = 0.0, step, 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += self.step


def test_measure_warms_up_then_repeats():
    clock = FakeClock(0.5)
    result = timing.measure(clock.work, warmup=3, repeats=4, clock=clock)
    assert clock.calls == 7 and result.samples == [0.5] * 4


def test_measure_repeats_short_calls_until_min_seconds_within_a_cap():
    clock = FakeClock(0.25)  # exact in binary: four calls make exactly one second
    assert len(timing.measure(clock.work, warmup=0, repeats=2, min_seconds=1.0, clock=clock).samples) == 4
    clock = FakeClock(0.001)
    assert len(timing.measure(clock.work, warmup=0, repeats=2, min_seconds=60, max_repeats=5, clock=clock).samples) == 5
    with pytest.raises(ValueError):
        timing.measure(clock.work, repeats=0)


# --- workload ----------------------------------------------------------------------------------


def test_large_slide_has_tissue_and_empty_background(tmp_path):
    info = workload.make_large_slide(tmp_path / "slide.npy", 300, block_rows=64)
    slide = np.load(tmp_path / "slide.npy", mmap_mode="r")
    assert slide.shape == (300, 300) and slide.dtype == np.uint16
    assert 0.3 < info["tissue_share"] < 0.55
    assert (slide > 0).mean() == pytest.approx(info["tissue_share"])
    assert slide[:, -1].max() == 0  # the far side is air


def test_tqdm_stand_in_only_where_tqdm_is_missing():
    assert workload.ensure_tqdm() is False  # tqdm is installed here: nothing replaced


# --- machine -----------------------------------------------------------------------------------


def test_machine_is_named_for_cpu_and_gpu_reports():
    info = machine.describe(torch.device("cpu"))
    assert info["cpu"] and info["cores"] >= 1 and info["versions"]["torch"] == torch.__version__
    assert f"{info['cores']} cores" in machine.one_line(info) and "no GPU used" in machine.one_line(info)
    info["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "compute_capability": "9.0",
                   "driver": "550.54.15", "cuda_runtime": "12.8"}
    line = machine.one_line(info)
    assert line.startswith("NVIDIA H100 80GB HBM3 (79.1 GiB, compute capability 9.0, driver 550.54.15, CUDA 12.8); host ")


# --- report ------------------------------------------------------------------------------------


def fake_result() -> dict:
    official = {"windows_timed": 200, "windows_per_s": 100.0, "grid": [28, 20], "grid_windows": 560,
                "seconds_per_slide_extrapolated": 5.6, "median_s": 0.01, "p95_s": 0.012, "peak_rss_mib": 500.0}
    encoder = [{"path": "onnxruntime fp32", "kind": "onnxruntime", "precision": "fp32", "batch": b, "windows_per_s": w,
                "median_s": b / w, "p95_s": b / w, "percent_of_peak": p, "peak": "fp32", "peak_rss_mib": 900.0}
               for b, w, p in ((1, 200.0, 20.0), (64, 400.0, 40.0))]
    e2e = [{"path": "onnxruntime fp32", "kind": "onnxruntime", "precision": "fp32", "slides": 8, "slides_per_s": 0.8,
            "seconds_per_slide_median": 1.4, "seconds_per_slide_p95": 1.6, "windows_per_s": 300.0,
            "skipped_share": 0.4, "load_seconds": 0.5, "windows_scored": 2400, "windows_skipped": 1600,
            "peak_rss_mib": 1000.0, "peak_device_mib": None, "note": "assembled by the bench"}]
    return {"format": report.FORMAT, "date": "2026-11-27", "started": "2026-11-27T00:00:00+00:00", "device": "cpu",
            "command": "swssl-bench --device cpu", "finished": "2026-11-27T00:05:00+00:00", "wall_seconds": 300.0,
            "machine": {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "memory_gib": 8.0, "os": "Linux",
                        "python": "3.11", "device": "cpu", "gpu": None, "versions": {"torch": "2.x"}},
            "images": {"note": "8 test slices", "slides": ["a"] * 8, "bank": ["b"] * 4},
            "peaks": {"fp32": {"precision": "fp32", "size": 2048, "flops_per_s": 2e11, "repetitions": 5}},
            "models": [{"backbone": "resnet18", "weights": "random (seed 0), untrained", "dim": 512,
                        "geometry": {"height": 1024, "width": 768, "patch": 128, "step": 32, "grid": "cover"},
                        "flops_per_window": 1.19e9, "official": official, "encoder": encoder, "end_to_end": e2e,
                        "native": None, "exports": [], "skipped": [{"what": "tensorrt", "why": "needs CUDA"}],
                        "errors": []}],
            "skipped": [], "errors": []}


def test_ratio_rows_are_ours_over_the_official_way():
    [row] = report.ratio_rows(fake_result()["models"][0])
    assert row["encoder_windows_per_s"] == 400.0 and row["encoder_batch"] == 64
    assert row["encoder_speedup"] == pytest.approx(4.0)
    assert row["e2e_windows_speedup"] == pytest.approx(3.0)
    assert row["slide_speedup"] == pytest.approx(5.6 / 1.4)
    assert row["percent_of_peak"] == 40.0


def test_render_markdown_names_the_machine_and_the_ratios():
    text = report.render_markdown(fake_result(), "cpu-2026-11-27.png")
    assert "Test CPU, 2 cores" in text
    assert "| onnxruntime fp32 | 400 (64) | 4.0x | 40.0 (fp32) | 300 | 3.0x | 1.40 s (1.60 s) | 4.0x |" in text
    assert "560 windows per slice" in text and "![windows/s against batch size](cpu-2026-11-27.png)" in text
    assert "tensorrt (needs CUDA)" in text and "assembled by the bench" in text
    assert "4.0x faster per slice than the official way" in " ".join(report.headline(fake_result()))


def test_write_report_writes_json_markdown_and_plot(tmp_path):
    written = report.write_report(fake_result(), tmp_path, "cpu-test")
    assert [p.name for p in written] == ["cpu-test.json", "cpu-test.md", "cpu-test.png"]
    data = json.loads((tmp_path / "cpu-test.json").read_text())
    assert data["models"][0]["ratios"][0]["encoder_speedup"] == pytest.approx(4.0) and data["headline"]
    assert (tmp_path / "cpu-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command -------------------------------------------------------------------------------


def test_smoke_run_writes_a_valid_report(tmp_path):
    out = tmp_path / "reports"
    result = CliRunner().invoke(cli.bench, ["--device", "cpu", "--smoke", "--backends", "torch", "--precisions", "fp32",
                                            "--out", str(out), "--work", str(tmp_path / "work"), "--name", "smoke"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "smoke.json").read_text())
    assert data["format"] == report.FORMAT and data["finished"] and data["machine"]["cores"] >= 1
    [model] = data["models"]
    assert not model["errors"] and model["flops_per_window"] > 0
    assert model["official"]["windows_per_s"] > 0 and model["official"]["grid_windows"] == 3 * 2
    assert {row["batch"] for row in model["encoder"] if row["mode"] == "exact"} == {1, 4}
    [dense] = [row for row in model["encoder"] if row["mode"] == "dense"]
    assert dense["path"] == "torch eager fp32 dense" and dense["windows_per_slice"] == 4 * 3
    assert dense["windows_per_s"] > 0 and 0 < model["dense_flops_per_window"] <= model["flops_per_window"]  # step = patch
    assert [(r["mode"], r["slides"]) for r in model["end_to_end"]] == [("exact", 2), ("dense", 2)]
    for row in model["end_to_end"]:  # the timed run's stage profile: its frames, the encoder among the stages
        assert row["stages"]["frames"] == 2 and {"embed", "score", "read"} <= set(row["stages"]["stages"])
        assert (row["batch"], row["batch_how"]) == (16, "given")  # --smoke fixes the batch; else probed
    scaling = data.get("bank_scaling")
    if scaling is not None:  # faiss installed: brute force, flat and ivf at the smoke's 2000 rows
        [size] = scaling["sizes"]
        assert size["rows"] == 2000 and size["flat"]["recall_at_1"] == 1.0 and 0 < size["ivf"]["recall_at_1"] <= 1
        assert size["coreset"]["seconds"] > 0
    for native in (model["native"], model["native_dense"]):
        assert native["windows_scored"] + native["windows_skipped"] == 8 * 8
        assert native["skipped_share"] > 0.3  # the generated slide's background is not encoded
    assert model["ratios"][0]["slide_speedup"] > 0
    text = (out / "smoke.md").read_text()
    assert "Smoke run" in text and "Ratios to the official way" in text and (out / "smoke.png").is_file()
    assert "Dense mode against exact mode" in text and "| torch eager fp32 dense |" in text
    assert "Where a slice's time goes" in text and ("Bank search as the bank grows" in text) == (scaling is not None)


def test_int8_peak_and_the_int8_paths_planned():
    peak = flops.int8_peak(size=64, warmup=0, repeats=2)
    assert peak["precision"] == "int8" and peak["flops_per_s"] > 0 and "MatMulInteger" in peak["kernel"]
    options = session.make_options(torch.device("cpu"), Path("out"), backends=["onnxruntime", "aoti"], modes=["exact"])
    assert options.export_precisions == ["fp32", "int8"]
    paths = session.plan_paths(options, {"skipped": []}, session.Session(options))
    assert [p.label for p in paths] == ["onnxruntime fp32", "onnxruntime int8", "aoti fp32"]  # no int8 AOTInductor
    assert session.peak_key(paths[1], torch.device("cpu")) == "int8"


def test_options_rejects_unknown_backends_and_precisions(tmp_path):
    for flag, value in (("--backends", "torch,tensorflow"), ("--precisions", "fp8")):
        result = CliRunner().invoke(cli.bench, ["--device", "cpu", "--smoke", flag, value, "--out", str(tmp_path)])
        assert result.exit_code == 2 and "unknown" in result.output


def test_defaults_by_device_and_smoke():
    cpu = session.make_options(torch.device("cpu"), Path("out"))
    assert cpu.backends == ["torch", "onnxruntime", "aoti"] and cpu.batches[-1] == 256 and not cpu.smoke
    smoke = session.make_options(torch.device("cpu"), Path("out"), smoke=True, batches=[2])
    assert smoke.batches == [2] and smoke.data == "synthetic" and smoke.slides == 2


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)


def test_dense_rows_are_set_beside_the_same_path_in_exact_mode():
    result = fake_result()
    model = result["models"][0]
    model["encoder"].append({"path": "onnxruntime fp32 dense", "kind": "onnxruntime", "precision": "fp32",
                             "mode": "dense", "batch": "slice", "windows_per_s": 2000.0, "median_s": 0.3, "p95_s": 0.3})
    model["end_to_end"].append({**model["end_to_end"][0], "path": "onnxruntime fp32 dense", "mode": "dense",
                                "seconds_per_slide_median": 0.35})
    [row] = report.dense_rows(model)
    assert row["encoder_vs_exact"] == pytest.approx(5.0) and row["slide_vs_exact"] == pytest.approx(4.0)
    assert row["slide_speedup"] == pytest.approx(16.0)  # 5.6 s the official way / 0.35 s
    text = report.render_markdown(result, None)
    assert "| onnxruntime fp32 dense | 2,000 | 400 (onnxruntime fp32) | 5.0x | 350 ms | 1.40 s | 4.0x | 16.0x |" in text
    assert "dense mode: onnxruntime fp32 dense 350 ms per slice end to end (4.0x its exact-mode path, " \
           "16.0x the official way)" in " ".join(report.headline(result))
