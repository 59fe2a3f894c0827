"""Calibrated scores: percentiles and thresholds against numpy / sklearn on known score lists, the held-out
split, the bank's metadata round trip, the out-of-domain check, and the decision end to end on a tiny split."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import f1_score

from swssl import cli
from swssl.config import build_config, load_preset
from swssl.data.datasets import Sample, discover
from swssl.errors import ConfigError
from swssl.model.checkpoint import save_checkpoint, weights_digest
from swssl.model.encoder import build_encoder
from swssl.scoring.bank import BANK, BankDamagedError, MemoryBank
from swssl.scoring.calibration import (Calibration, Decision, best_f1, calibrate, choose_threshold,
                                       resolve_threshold, sensitivity_threshold)
from swssl.scoring.domain import Domain, FrameStats
from swssl.scoring.evaluate import build_calibrated_bank, calibration_split, default_scorer_options


def calibration(normal, abnormal=(), windows=None):
    return calibrate("aligned", {"radius": 0, "top": 1}, list(normal), list(abnormal), windows, "test", [])


@pytest.mark.parametrize("seed", range(4))
def test_percentile_and_normal_percentile_threshold_against_numpy(seed):
    rng = np.random.default_rng(seed)
    normal = np.round(rng.normal(8, 1, size=rng.integers(1, 40)), 1)  # rounded: ties
    c = calibration(normal)
    for score in [*normal, *rng.normal(8, 2, size=20), normal.min() - 1, normal.max() + 1]:
        assert c.percentile(score) == pytest.approx(100 * np.mean(normal <= score))
    for p in (0, 50, 90, 99, 100):
        t = choose_threshold(f"normal-percentile:{p}", c)
        assert t.value == pytest.approx(np.percentile(normal, p))
        assert f"{p}th percentile of {len(normal)} held-out normal images" in t.description
    assert choose_threshold("normal-percentile", c).value == pytest.approx(np.percentile(normal, 99))


def brute_f1(normal, abnormal):
    scores = np.concatenate([normal, abnormal])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
    candidates = sorted(set(scores), reverse=True)  # highest first: a tie goes to the higher threshold
    values = [f1_score(labels, scores >= t) for t in candidates]
    best = int(np.argmax(values))
    return candidates[best], values[best]


@pytest.mark.parametrize("seed", range(6))
def test_f1_and_sensitivity_thresholds_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    normal = np.round(rng.normal(8, 1, size=rng.integers(1, 25)), 1)
    abnormal = np.round(rng.normal(9, 1.5, size=rng.integers(1, 25)), 1)
    value, f1 = best_f1(normal, abnormal)
    expected_value, expected_f1 = brute_f1(normal, abnormal)
    assert (value, f1) == pytest.approx((expected_value, expected_f1))
    c = calibration(normal, abnormal)
    assert choose_threshold("f1", c).value == pytest.approx(expected_value)
    for target in (0.0, 0.3, 0.5, 0.9, 1.0):
        t = sensitivity_threshold(abnormal, target)
        feasible = [s for s in abnormal if np.mean(abnormal >= s) >= target]
        assert t == max(feasible)
        assert choose_threshold(f"sensitivity:{target}", c).value == t


def test_threshold_rules_and_their_errors():
    c = calibration([1.0, 2.0, 3.0])
    assert choose_threshold("2.5", c).value == 2.5 and choose_threshold("2.5", None).rule == "2.5"
    assert choose_threshold("2.5", None).flags(2.5) and not choose_threshold("2.5", None).flags(2.4)
    assert resolve_threshold(None, None) is None
    assert resolve_threshold(None, c).rule == "normal-percentile:99"
    for rule, message in (("f1", "needs abnormal images"), ("sensitivity:0.9", "needs abnormal images"),
                          ("normal-percentile:101", "not a number from 0 to 100"), ("percentile:9", "expected"),
                          ("nan", "not a finite number")):
        with pytest.raises(ConfigError, match=message):
            choose_threshold(rule, c)
    with pytest.raises(ConfigError, match="no calibration"):
        choose_threshold("normal-percentile:99", None)
    with pytest.raises(ConfigError, match="from 0 to 1"):
        choose_threshold("sensitivity:2", calibration([1.0], [2.0]))


def test_window_quantiles_and_dict_round_trip():
    maps = [np.array([[1.0, np.nan], [3.0, 2.0]]), np.array([[5.0, 4.0]])]
    c = calibration([3.0, 5.0], [9.0], maps)
    assert c.window_quantiles == pytest.approx(np.percentile([1, 3, 2, 5, 4], np.linspace(0, 100, 101)))
    again = Calibration.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again.percentile(4.0) == c.percentile(4.0) == 50.0
    assert again.window_quantiles == pytest.approx(c.window_quantiles) and list(again.abnormal) == [9.0]


def samples(train, val_normal=0, val_abnormal=0):
    return ([Sample(f"t{i}.png", 0, "train") for i in range(train)]
            + [Sample(f"v{i}.png", 0, "val") for i in range(val_normal)]
            + [Sample(f"a{i}.png", 1, "val") for i in range(val_abnormal)])


def test_held_out_images_are_the_val_normals_or_every_tenth_training_image():
    bank, normal, abnormal, source = calibration_split(samples(5, 3, 2))
    assert len(bank) == 5 and [s.path for s in normal] == ["v0.png", "v1.png", "v2.png"] and len(abnormal) == 2
    assert source == "val split: 3 normal images"
    bank, normal, _, source = calibration_split(samples(25))
    assert [s.path for s in normal] == ["t9.png", "t19.png"] and len(bank) == 23
    assert not {s.path for s in normal} & {s.path for s in bank} and "2 of 25 training" in source
    assert [s.path for s in calibration_split(samples(3))[1]] == ["t2.png"]
    assert calibration_split(samples(1))[1] == []


def stats(height=1024, width=768, bits=16, mean=0.3, median=0.25):
    return FrameStats(height, width, bits, mean, median)


def test_domain_warns_for_frames_unlike_the_training_images():
    domain = Domain.of([stats(), stats(1000, 750, 16, 0.25, 0.2)])
    assert domain.warning(stats(1100, 800, 16, 0.34, 0.33)) == ""
    ct = domain.warning(stats(128, 128, 12, 0.05, 0.45))
    for part in ("size 128 x 128 px (training images 1000-1024 x 750-768)", "aspect ratio 1.00", "12-bit",
                 "mean intensity 0.05 (training 0.25-0.30)", "median intensity 0.45 (training 0.20-0.25)"):
        assert part in ct
    assert "size" not in domain.warning(stats(2048, 1536)) and "size" in domain.warning(stats(2049 * 2, 1536))
    assert Domain.from_dict(json.loads(json.dumps(domain.to_dict()))) == domain


def test_decision_fields():
    decision = Decision(calibration([1.0, 2.0, 3.0, 4.0]), choose_threshold("3", None), Domain.of([stats()]))
    judged = decision.judge(3.0, stats(128, 128))
    assert judged["percentile"] == 75.0 and judged["anomalous"] is True and "size 128 x 128" in judged["warning"]
    assert Decision(None, None).judge(3.0) == {"percentile": None, "anomalous": None, "warning": ""}
    assert "no calibration" in Decision(None, None).describe()


def test_calibrations_and_domain_survive_the_bank_file_and_are_checksummed(tmp_path):
    rng = np.random.default_rng(0)
    bank = MemoryBank(torch.tensor(rng.normal(size=(2, 3, 2, 4)), dtype=torch.float16), torch.ones(2, 3, 2,
                      dtype=torch.bool), load_preset("small"), "digest", ["a", "b"], domain=Domain.of([stats()]))
    bank.calibrations["aligned {}"] = calibration([1.0, 2.0])
    bank.save(tmp_path / "bank.safetensors")
    loaded = MemoryBank.load(tmp_path / "bank.safetensors")
    assert loaded.domain == bank.domain and loaded.calibrations["aligned {}"].percentile(1.5) == 50.0
    data = (tmp_path / "bank.safetensors").read_bytes()
    edited = data.replace(b'normal\\": [1.0, 2.0]', b'normal\\": [1.0, 9.0]')  # a JSON string in the JSON header
    assert edited != data
    (tmp_path / "edited.safetensors").write_bytes(edited)
    with pytest.raises(BankDamagedError, match="damaged"):
        MemoryBank.load(tmp_path / "edited.safetensors")


# --- end to end on a tiny split ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated_run(tiny_data, tmp_path_factory):
    """A random-weight run on the tiny data, its bank calibrated on the val split (2 normal, 2 abnormal)."""
    config = build_config("small", tiny_data / "tiny.toml")
    torch.manual_seed(0)
    encoder = build_encoder(config, weights="none").eval()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "checkpoint.pt", encoder, None, 0, config, [])
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    bank, built = build_calibrated_bank(encoder, discover(tiny_data / "manifest.csv"), config, weights_digest(encoder), 64)
    assert set(built) == {"aligned", "global", "reference"}  # the scorers it calibrated with, for swssl-bank
    bank.save(run / BANK)
    return run, bank


def test_the_bank_is_calibrated_on_the_val_split_with_every_scorer(calibrated_run, tiny_data):
    _, bank = calibrated_run
    assert len(bank.paths) == 6 and bank.domain.height == (128, 128) and bank.domain.bits == (16,)
    for name, options in default_scorer_options().items():
        c = bank.calibration(name, options)
        assert c.source == "val split: 2 normal images, 2 abnormal" and len(c.normal) == 2 and len(c.abnormal) == 2
        assert (c.window_quantiles is None) == (name == "reference")
    assert bank.calibration("aligned", {"radius": 1, "top": 1}) is None


def test_eval_reports_percentiles_and_the_decision(calibrated_run, tiny_data, tmp_path):
    run, bank = calibrated_run
    result = CliRunner().invoke(cli.evaluate, [str(run), "--data", str(tiny_data / "manifest.csv"), "--split", "val",
                                               "--scorer", "aligned", "--threshold", "f1", "--out", str(tmp_path),
                                               "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(next(tmp_path.rglob("eval.json")).read_text())
    c = bank.calibration("aligned", {"radius": 0, "top": 1})
    value, _ = best_f1(c.normal, c.abnormal)
    assert report["threshold"] == pytest.approx(value) and report["threshold_rule"].startswith("f1: best F1")
    rows = (next(tmp_path.rglob("images.csv")).read_text()).splitlines()
    assert rows[0].split(",")[:5] == ["path", "label", "score", "percentile", "anomalous"]
    flagged = [(int(r.split(",")[1]), r.split(",")[4] == "true") for r in rows[1:]]
    scores = [float(r.split(",")[2]) for r in rows[1:]]
    assert [f for _, f in flagged] == [s >= value for s in scores]
    abnormal = [f for label, f in flagged if label == 1]
    assert report["sensitivity_at_threshold"] == pytest.approx(sum(abnormal) / len(abnormal))


def test_infer_rows_carry_percentile_flag_and_domain_warning(calibrated_run, tiny_data, tmp_path):
    run, bank = calibrated_run
    small = np.clip(np.random.default_rng(1).random((40, 40)), 0, 1)
    Image.fromarray((small * 255).astype(np.uint8)).save(tmp_path / "small.png")  # 8-bit, 40 x 40: unlike training
    slides = [tiny_data / "test-0.png", tiny_data / "test-1.png", tmp_path / "small.png"]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.infer, [*map(str, slides), "--model", str(run), "--out", str(out), "--quiet",
                                            "--device", "cpu", "--threshold", "normal-percentile:50"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    header, records = lines[0], {r["path"].rsplit("/", 1)[-1]: r for r in lines[1:]}
    c = bank.calibration("aligned", {"radius": 0, "top": 1})
    assert header["threshold"]["value"] == pytest.approx(np.percentile(c.normal, 50))
    for record in records.values():
        assert record["percentile"] == pytest.approx(100 * np.mean(c.normal <= record["score"]))
        assert record["anomalous"] == (record["score"] >= header["threshold"]["value"])
    assert records["test-0.png"]["warning"] == ""
    assert "size 40 x 40 px" in records["small.png"]["warning"] and "8-bit" in records["small.png"]["warning"]
    assert "warning:" in result.output and "small.png" in result.output


def test_a_ct_slice_is_warned_about_and_its_dicom_map_references_it(calibrated_run, tmp_path):
    """pydicom's 128 x 128 CT_small.dcm against a run of 128 x 96 16-bit images: scored, warned about (its
    aspect ratio and intensity), and written as a Parametric Map that references it."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    run, _ = calibrated_run
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.infer, [source, "--model", str(run), "--out", str(out), "--quiet",
                                            "--device", "cpu", "--dicom"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "scores.jsonl").read_text().splitlines()[1])
    assert record["status"] == "ok" and "aspect ratio 1.00" in record["warning"] and "mean intensity" in record["warning"]
    written = pydicom.dcmread(out / record["dicom"])
    original = pydicom.dcmread(source, stop_before_pixels=True)
    assert written.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and written.StudyInstanceUID == original.StudyInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for frame in written.PerFrameFunctionalGroupsSequence
                  for derivation in frame.DerivationImageSequence for item in derivation.SourceImageSequence}
    assert referenced == {original.SOPInstanceUID}
