"""Streaming native geometry: the same windows, foreground and scores as the whole frame held in memory,
with host memory bounded by a few strips whatever the slide size."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from swssl.scoring.bank import MemoryBank
from swssl.config import load_preset
from swssl.windows.embed import embed_image
from swssl.errors import ConfigError, ImageReadError
from swssl.windows.geometry import grid, window_max
from swssl.model.encoder import build_encoder
from swssl.data.readers import open_image
from swssl.scoring.scorers import AlignedScorer, GlobalScorer, ReferenceScorer
from swssl.windows.stream import SlideStream, scale_factor
from swssl.windows.tiling import score_source


def config_for(patch: int, step: int, policy: str = "cover", threshold: float = 0.0, height: int = 128,
               width: int = 128):
    return load_preset("small").override({"geometry": {"height": height, "width": width, "patch": patch,
                                                      "step": step, "grid": policy},
                                         "preprocess": {"foreground_threshold": threshold}})


def tissue(shape: tuple[int, int], seed: int, empty_fraction: float = 0.4) -> np.ndarray:
    """uint16 texture with empty (zero) areas: a left band, a horizontal band and a corner."""
    rng = np.random.default_rng(seed)
    image = (rng.random(shape) * 40000 + 5000).astype(np.uint16)
    image[:, : int(shape[1] * empty_fraction)] = 0
    image[shape[0] // 2 : shape[0] // 2 + shape[0] // 8] = 0
    image[-shape[0] // 5 :, -shape[1] // 5 :] = 0
    return image


def foreign_bank(encoder, config, seed: int = 99) -> MemoryBank:
    """A bank from other images than the one scored (so no distance sits at the float-rounding floor)."""
    images = [tissue((config.geometry.height, config.geometry.width), seed + i, 0.1).astype(np.float32) / 65535
              for i in range(2)]
    embedded = [embed_image(encoder, image, config, 64) for image in images]
    return MemoryBank(torch.stack([e for e, _ in embedded]), torch.stack([f for _, f in embedded]), config, "test",
                      ["a", "b"])


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder(config_for(32, 16)).eval()


@pytest.mark.parametrize("shape, patch, step, policy, scale, block_rows, threshold", [
    ((300, 250), 64, 24, "cover", 1.0, None, 0.0),
    ((301, 257), 32, 16, "reference", 1.0, 7, 0.0),  # odd width: pooling width 1
    ((200, 200), 32, 40, "cover", 1.0, 33, 0.0),  # step > patch: rows between window rows are skipped
    ((407, 333), 32, 16, "cover", 0.5, 5, 0.3),  # scaled, and a threshold above zero
    ((512, 416), 32, 32, "cover", 0.25, 16, 0.0),
])
def test_windows_and_foreground_equal_the_frame_in_memory(tmp_path, shape, patch, step, policy, scale, block_rows,
                                                          threshold):
    np.save(tmp_path / "slide.npy", tissue(shape, 1))
    config = config_for(patch, step, policy, threshold)
    with open_image(tmp_path / "slide.npy") as reader:
        frame = torch.from_numpy(reader.read())
        k = scale_factor(scale)
        expected_image = F.avg_pool2d(frame[None, None], k)[0, 0] if k > 1 else frame
        rows, cols = grid(config.geometry, *expected_image.shape)
        expected_fg = (window_max(expected_image, rows, cols, patch) > threshold).numpy()
        stream = SlideStream(reader, 0, config, scale=scale, block_rows=block_rows, thumbnail_side=40)
        batches = list(stream.batches(batch_size=10))
    assert stream.shape == tuple(expected_image.shape)
    np.testing.assert_array_equal(stream.rows, rows)
    np.testing.assert_array_equal(stream.cols, cols)
    np.testing.assert_array_equal(stream.foreground, expected_fg)
    assert 0 < stream.scored < stream.windows and stream.skipped == stream.windows - expected_fg.sum()
    assert [len(b.rows) for b in batches[:-1]] == [10] * (len(batches) - 1) and 0 < len(batches[-1].rows) <= 10
    r_index = torch.cat([b.rows for b in batches])
    c_index = torch.cat([b.cols for b in batches])
    windows = torch.cat([b.windows for b in batches])
    # Row-major order over exactly the foreground windows, each equal to the in-memory window.
    np.testing.assert_array_equal((r_index * len(cols) + c_index).numpy(), np.flatnonzero(expected_fg))
    for j in range(len(windows)):
        y, x = rows[r_index[j]], cols[c_index[j]]
        assert torch.equal(windows[j, 0], expected_image[y:y + patch, x:x + patch]), j
    t = stream.thumbnail_factor
    assert max(stream.thumbnail.shape) <= 40 and stream.thumbnail.shape == tuple(-(-s // t) for s in stream.shape)
    np.testing.assert_allclose(stream.thumbnail[:-1, :-1],
                               F.avg_pool2d(expected_image[None, None], t)[0, 0].numpy()[:stream.thumbnail.shape[0] - 1,
                                                                                         :stream.thumbnail.shape[1] - 1],
                               rtol=1e-5, atol=1e-6)


def test_embeddings_are_bitwise_those_of_embed_image(tmp_path, encoder):
    """Batches hold the same windows in the same order as embed_image forms them, so the encoder sees identical calls."""
    np.save(tmp_path / "slide.npy", tissue((300, 250), 2))
    config = config_for(64, 24)
    with open_image(tmp_path / "slide.npy") as reader:
        embeddings, foreground = embed_image(encoder, reader.read(), config, batch_size=10)
        stream = SlideStream(reader, 0, config, block_rows=33)
        with torch.inference_mode():
            out = [(b.rows, b.cols, encoder(b.windows)) for b in stream.batches(10)]
    r, c, e = (torch.cat(parts) for parts in zip(*out))
    assert torch.equal(e, embeddings[r, c])
    np.testing.assert_array_equal(stream.foreground, foreground.numpy())


def write_tiled(path: Path, image: np.ndarray, tile: int = 256) -> None:
    tifffile.imwrite(path, image, bigtiff=True, tile=(tile, tile), compression="zlib")


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_native_score_map_equals_scoring_the_array_in_memory(tmp_path, encoder, scale):
    """A 3000 x 2000 16-bit tiled BigTIFF: streamed map == embed_image + GlobalScorer.score on the whole array."""
    image = np.zeros((3000, 2000), np.uint16)
    image[200:1400, 300:1500] = tissue((1200, 1200), 3, 0.0)
    image[2100:2900, 900:1900] = tissue((800, 1000), 4, 0.2)
    write_tiled(tmp_path / "slide.tif", image)
    config = config_for(64, 64) if scale == 1.0 else config_for(32, 16)
    bank = foreign_bank(encoder, config)
    scorer = GlobalScorer(bank, k=2, top=3)
    with open_image(tmp_path / "slide.tif") as reader:
        streamed = score_source(SlideStream(reader, 0, config, scale=scale, batch_size=64), encoder, {"s": scorer})["s"]
        whole = torch.from_numpy(reader.read())
    del image
    k = scale_factor(scale)
    whole = F.avg_pool2d(whole[None, None], k)[0, 0] if k > 1 else whole
    embeddings, foreground = embed_image(encoder, whole, config, batch_size=64)
    expected = scorer.score(embeddings, foreground)
    expected_map = expected.window_scores
    assert streamed.window_scores.shape == expected_map.shape
    np.testing.assert_array_equal(np.isnan(streamed.window_scores), np.isnan(expected_map))
    np.testing.assert_allclose(streamed.window_scores, expected_map, rtol=1e-5, equal_nan=True)
    assert streamed.score == pytest.approx(expected.score, rel=1e-5)
    assert streamed.scored == int(foreground.sum()) and streamed.skipped == foreground.numel() - streamed.scored
    assert 0 < streamed.scored < foreground.numel()


def test_aligned_in_native_needs_the_runs_grid(tmp_path, encoder):
    config = config_for(32, 16, height=128, width=96)
    image = tissue((128, 96), 5, 0.2)
    np.save(tmp_path / "same.npy", image)
    np.save(tmp_path / "bigger.npy", tissue((200, 96), 5, 0.2))
    bank = foreign_bank(encoder, config)
    with open_image(tmp_path / "same.npy") as reader:  # the run's own size: the same as swssl-eval
        embeddings, foreground = embed_image(encoder, reader.read(), config, batch_size=16)
        for scorer in (AlignedScorer(bank, radius=1), ReferenceScorer(bank)):
            streamed = score_source(SlideStream(reader, 0, config, batch_size=16), encoder, {"s": scorer})["s"]
            expected = scorer.score(embeddings, foreground)
            assert streamed.score == pytest.approx(expected.score, rel=1e-5)
    with open_image(tmp_path / "bigger.npy") as reader, pytest.raises(ConfigError, match="needs the run's 7 x 5 grid"):
        score_source(SlideStream(reader, 0, config), encoder, {"aligned": AlignedScorer(bank)})


def test_scale_must_be_one_over_a_whole_number():
    assert [scale_factor(s) for s in (1, 1.0, 0.5, 0.25, 0.2, 1 / 3)] == [1, 1, 2, 4, 5, 3]
    for bad in (0.3, 0.75, 2.0, 0, -0.5, float("nan")):
        with pytest.raises(ConfigError, match="scale"):
            scale_factor(bad)


def test_too_small_frame_is_refused(tmp_path):
    np.save(tmp_path / "small.npy", tissue((50, 400), 6))
    with open_image(tmp_path / "small.npy") as reader, pytest.raises(ConfigError, match="smaller than one 64 px"):
        SlideStream(reader, 0, config_for(64, 32))


def test_read_error_in_the_prefetch_thread_reaches_the_caller(tmp_path, encoder):
    np.save(tmp_path / "slide.npy", tissue((400, 200), 7, 0.1))
    with open_image(tmp_path / "slide.npy") as reader:
        real_read, calls = reader.read, []

        def failing_read(region=None, frame=0):
            calls.append(region)
            if len(calls) == 3:
                raise ImageReadError(reader.path, "cannot read TIFF pixels (broken tile)")
            return real_read(region, frame)

        reader.read = failing_read
        stream = SlideStream(reader, 0, config_for(32, 16), block_rows=32)
        with pytest.raises(ImageReadError, match="broken tile"):
            for _ in stream.batches(8):
                pass
    assert len(calls) == 3  # the thread stopped at the failure


# --- a gigapixel-class slide: 16384 x 16384, 16-bit, tiled BigTIFF --------------------------------

BIG, TILE, PATCH = 16384, 512, 64
BLOBS = [(1, 2), (3, 27), (7, 9), (12, 20), (16, 4), (21, 30), (25, 14), (30, 1), (8, 31), (28, 25)]  # tile (row, col)


def big_tile(row: int, col: int) -> np.ndarray:
    """Tile (row, col) of the big slide: zero, except textured tissue blobs in a few tiles."""
    tile = np.zeros((TILE, TILE), np.uint16)
    if (row, col) in BLOBS:
        rng = np.random.default_rng(row * 100 + col)
        y, x = np.mgrid[:TILE, :TILE]
        disc = (y - 256) ** 2 + (x - 256) ** 2 < 200 ** 2
        tile[disc] = (rng.random(disc.sum()) * 30000 + 10000).astype(np.uint16)
    return tile


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "slide.tif"
    tiles = (big_tile(r, c) for r in range(BIG // TILE) for c in range(BIG // TILE))
    tifffile.imwrite(path, tiles, shape=(BIG, BIG), dtype=np.uint16, tile=(TILE, TILE), bigtiff=True,
                     compression="zlib")
    return path


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    from swssl.scoring.bank import BANK
    from swssl.model.checkpoint import save_checkpoint, weights_digest

    config = config_for(PATCH, PATCH, height=256, width=256)
    torch.manual_seed(0)
    encoder = build_encoder(config).eval()
    run = tmp_path_factory.mktemp("bigrun")
    save_checkpoint(run / "checkpoint.pt", encoder, None, 0, config, [])
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    bank = foreign_bank(encoder, config)
    bank.encoder_digest = weights_digest(encoder)
    bank.save(run / BANK)
    return run, encoder, config, bank


def test_16k_bigtiff_streams_in_bounded_memory(big_slide, big_run, tmp_path):
    run, encoder, config, bank = big_run
    out = tmp_path / "out"
    child = [sys.executable, "-c", "import sys; from swssl.cli import infer; sys.argv[0] = 'swssl-infer'; infer()",
             str(big_slide), "--model", str(run), "--out", str(out), "--scale", "1", "--batch", "64",
             "--device", "cpu", "--heatmaps", "--quiet"]
    # A fresh parent whose only child is the runner, so RUSAGE_CHILDREN is the runner's own peak.
    probe = textwrap.dedent(f"""
        import json, resource, subprocess, sys, time
        started = time.perf_counter()
        done = subprocess.run({child!r}, capture_output=True, text=True)
        print(json.dumps({{"rc": done.returncode, "out": done.stdout, "err": done.stderr[-3000:],
                           "seconds": time.perf_counter() - started,
                           "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
    """)
    result = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                       check=True).stdout)
    assert result["rc"] == 0, result["err"] + result["out"]
    peak_gib = result["peak_kib"] / 2**20
    print(f"\n16k x 16k BigTIFF: peak RSS {peak_gib:.2f} GiB, {result['seconds']:.1f} s; {result['out'].strip()}")
    assert peak_gib < 2.0 * 10**9 / 2**30, f"peak resident memory {peak_gib:.2f} GiB"

    record = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()][-1]
    assert record["status"] == "ok" and record["geometry"] == "native" and record["grid"] == [256, 256]
    # The foreground is exactly the windows that touch a blob (64 px windows tile the 512 px tiles).
    expected_fg = np.zeros((256, 256), bool)
    for r, c in BLOBS:
        expected_fg[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = big_tile(r, c).reshape(8, 64, 8, 64).max(axis=(1, 3)) > 0
    maps = np.load(out / record["score_map"])
    np.testing.assert_array_equal(~np.isnan(maps), expected_fg)
    assert record["windows_scored"] == expected_fg.sum() and record["windows_skipped"] == 256 * 256 - expected_fg.sum()
    assert record["score"] == pytest.approx(np.nanmax(maps), rel=1e-6)
    # Spot check: a few windows read on their own, encoded and scored, match the streamed map.
    scorer = GlobalScorer(bank)
    positions = list(zip(*np.nonzero(expected_fg)))[::97] + [np.unravel_index(np.nanargmax(maps), maps.shape)]
    with open_image(big_slide) as reader:
        windows = torch.stack([torch.from_numpy(reader.read((int(r) * PATCH, int(c) * PATCH, PATCH, PATCH)))
                               for r, c in positions])[:, None]
    with torch.inference_mode():
        alone = scorer.score_windows(encoder(windows)).numpy()
    np.testing.assert_allclose([maps[r, c] for r, c in positions], alone, rtol=1e-4)
    overlay = out / record["heatmap"]
    assert overlay.is_file()
