"""swssl-compare: the side-by-side table and the paired bootstrap of the AUROC difference."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from swssl import cli
from swssl.scoring.compare import paired_bootstrap
from swssl.scoring.metrics import image_auroc


def write_report(folder, scorer, labels, scores):
    out = folder / f"test-{scorer}"
    out.mkdir(parents=True)
    report = {"scorer": scorer, "image_auroc": image_auroc(labels, scores), "pixel_auroc": None,
              "lesion_hit_rate": 0.5, "seconds_all_scorers": 3.0, "images": len(labels)}
    (out / "eval.json").write_text(json.dumps(report))
    rows = ["path,label,score"] + [f"img{i}.png,{label},{score}" for i, (label, score) in enumerate(zip(labels, scores))]
    (out / "images.csv").write_text("\n".join(rows) + "\n")


def test_bootstrap_of_identical_scores_is_zero_and_of_a_better_scorer_positive():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 20)
    noisy = rng.random(40)
    perfect = labels + 0.1 * rng.random(40)
    assert paired_bootstrap(labels, noisy, noisy, resamples=200) == (0.0, 0.0, 0.0)
    delta, low, high = paired_bootstrap(labels, noisy, perfect, resamples=500)
    assert delta == pytest.approx(1.0 - image_auroc(labels, noisy))
    assert 0 < low <= delta <= high <= 1


def test_table_of_two_report_folders(tmp_path):
    labels = [0, 0, 1, 1]
    write_report(tmp_path / "eval", "aligned", labels, [0.1, 0.6, 0.5, 0.9])
    write_report(tmp_path / "eval-dense", "aligned", labels, [0.1, 0.2, 0.5, 0.9])
    result = CliRunner().invoke(cli.compare, [str(tmp_path / "eval"), str(tmp_path / "eval-dense")])
    assert result.exit_code == 0, result.output
    row = [line for line in result.output.splitlines() if line.startswith("| aligned")][0]
    assert "| 0.7500 | 1.0000 |" in row and "+0.2500 [" in row
    result = CliRunner().invoke(cli.compare, [str(tmp_path)])
    assert result.exit_code == 1 and "no test-<scorer>/eval.json" in result.output


def test_two_runs_eval_folders_are_told_apart_by_their_run(tmp_path):
    labels = [0, 0, 1, 1]
    write_report(tmp_path / "resnet" / "eval", "global", labels, [0.1, 0.6, 0.5, 0.9])
    write_report(tmp_path / "mobilenet" / "eval", "global", labels, [0.1, 0.2, 0.5, 0.9])
    result = CliRunner().invoke(cli.compare, [str(tmp_path / "resnet" / "eval"), str(tmp_path / "mobilenet" / "eval")])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert "image AUROC (resnet/eval)" in header and "image AUROC (mobilenet/eval)" in header


def test_a_report_folder_itself_and_option_variants(tmp_path):
    """A leaf report folder is accepted (its row is its scorer, so two leaves of a scorer line up); in an eval
    folder each scorer-option variant is its own row, and of two --images subsets the larger is shown."""
    labels = [0, 0, 1, 1]
    eval_dir = tmp_path / "run" / "eval"
    write_report(eval_dir, "aligned", labels, [0.1, 0.6, 0.5, 0.9])  # test-aligned: 0.75
    (eval_dir / "test-aligned").rename(eval_dir / "test-aligned-radius1")
    write_report(eval_dir, "aligned", labels, [0.1, 0.2, 0.5, 0.9])  # test-aligned: 1.0
    write_report(eval_dir, "global", labels[:2] + [1], [0.1, 0.9, 0.5])  # a 1 + 1 subset: 0.5 ...
    (eval_dir / "test-global").rename(eval_dir / "test-global-n1")
    write_report(eval_dir, "global", labels, [0.9, 0.8, 0.1, 0.2])  # ... and the whole split: 0.0
    runner = CliRunner()
    result = runner.invoke(cli.compare, [str(eval_dir / "test-aligned-radius1"), str(eval_dir / "test-aligned")])
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| aligned | 0.7500 | 1.0000 |") and "+0.2500 [" in rows[0]
    result = runner.invoke(cli.compare, [str(eval_dir)])
    assert result.exit_code == 0, result.output
    rows = [line.split(" | ")[:2] for line in result.output.splitlines()[2:]]
    assert rows == [["| aligned", "1.0000"], ["| aligned-radius1", "0.7500"], ["| global", "0.0000"]]


def test_two_leaf_reports_of_two_runs_are_told_apart(tmp_path):
    labels = [0, 0, 1, 1]
    write_report(tmp_path / "a" / "eval", "aligned", labels, [0.1, 0.6, 0.5, 0.9])
    write_report(tmp_path / "b" / "eval", "aligned", labels, [0.1, 0.2, 0.5, 0.9])
    result = CliRunner().invoke(cli.compare, [str(tmp_path / f / "eval" / "test-aligned") for f in "ab"])
    assert result.exit_code == 0, result.output
    assert "image AUROC (a/eval/test-aligned)" in result.output.splitlines()[0]
