"""Dense mode: geometry, receptive field, tile stitching, pooling, streaming, refusals, and the commands."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from swssl import cli
from swssl.scoring.bank import BankMismatchError, MemoryBank, bank_file
from swssl.model.checkpoint import save_checkpoint
from swssl.config import load_preset
from swssl.windows.dense import embed_dense, tiled_feature_map
from swssl.windows.embed import embed_image
from swssl.errors import ConfigError, SwsslError
from swssl.windows.geometry import canvas_shape, grid
from swssl.scoring.metrics import pixel_map
from swssl.model.encoder import build_encoder
from swssl.data.readers import open_image
from swssl.scoring.scorers import AlignedScorer, GlobalScorer
from swssl.windows.stream import SlideStream
from swssl.windows.tiling import ImageScore, WindowGrid, score_source


def dense_config(height: int = 256, width: int = 192, patch: int = 64, step: int = 32, policy: str = "cover"):
    return load_preset("small").override({"geometry": {"height": height, "width": width, "patch": patch,
                                                      "step": step, "grid": policy, "mode": "dense"}}).validate()


def texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """float32 in [0, 1] with an empty (zero) left band, so some windows are background."""
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    image[:, : shape[1] // 2] = 0
    return image


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_encoder(dense_config()).eval()


@pytest.fixture(scope="module")
def mobilenet_v2():
    """Inverted residual blocks, depthwise convolutions, identity shortcuts: not a ResNet."""
    torch.manual_seed(0)
    return build_encoder(dense_config().override({"model": {"backbone": "mobilenet_v2"}})).eval()


@pytest.fixture(scope="module")
def resnet18_mid():
    """Mid-level features: stages 2 + 3 at stride 16, a 3-cell neighbourhood."""
    torch.manual_seed(0)
    return build_encoder(dense_config().override({"model": {"stages": [2, 3], "neighbourhood": 3}})).eval()


def per_pixel_encoder(config) -> nn.Module:
    """An encoder whose trunk is a per-pixel network (1 x 1 convolutions) averaged over 32 x 32 cells."""
    torch.manual_seed(1)
    encoder = build_encoder(config).eval()
    network = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.AvgPool2d(32))
    encoder.trunk = create_feature_extractor(network, {"3": encoder.layout.stages[-1].node}).eval()
    return encoder


def per_pixel_reference(encoder, canvas: np.ndarray, rows, cols, patch: int) -> np.ndarray:
    """float64 numpy: each window's embedding = the mean over its pixels of the per-pixel network."""
    conv1, conv2 = encoder.trunk.get_submodule("0"), encoder.trunk.get_submodule("2")
    w1, b1 = conv1.weight.detach().double().numpy()[:, :, 0, 0], conv1.bias.detach().double().numpy()
    w2, b2 = conv2.weight.detach().double().numpy()[:, :, 0, 0], conv2.bias.detach().double().numpy()
    mean, std = encoder.mean.double().numpy().ravel(), encoder.std.double().numpy().ravel()
    x = (canvas.astype(np.float64)[..., None] - mean) / std  # H x W x 3
    features = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2  # H x W x 5
    return np.stack([np.stack([features[y:y + patch, c:c + patch].mean((0, 1)) for c in cols]) for y in rows])


def test_geometry_must_be_multiples_of_the_trunk_stride():
    with pytest.raises(ConfigError, match="multiples of the feature stride"):
        load_preset("small").override({"geometry": {"patch": 100}}).with_mode("dense")
    with pytest.raises(ConfigError, match="multiples of the feature stride"):
        load_preset("small").override({"geometry": {"step": 16}}).with_mode("dense")
    with pytest.raises(ConfigError, match="'exact' or 'dense'"):
        load_preset("small").with_mode("sparse")
    assert load_preset("small").with_mode("dense").geometry.mode == "dense"


@pytest.mark.parametrize("size, policy, canvas, starts", [
    ((256, 192), "cover", (256, 192), 7),  # (256 - 64) / 32 + 1 windows: no padding
    ((200, 150), "cover", (224, 160), 6),  # exact mode has 6 too, the last aligned to the border
    ((200, 150), "reference", (224, 160), 4),  # (200 - 64) // 32 official windows
])
def test_canvas_and_grid(size, policy, canvas, starts):
    config = dense_config(policy=policy)
    assert canvas_shape(*size, config.geometry, config.stride) == canvas
    rows, cols = grid(config.geometry, *size)
    exact_rows, exact_cols = grid(config.with_mode("exact").geometry, *size)
    assert len(rows) == starts and (len(rows), len(cols)) == (len(exact_rows), len(exact_cols))
    assert all(r % 32 == 0 for r in rows) and np.all(np.diff(rows) == 32)
    assert rows[-1] + 64 <= canvas[0] and cols[-1] + 64 <= canvas[1]


@pytest.mark.parametrize("backbone, stages, neighbourhood, expected", [
    ("resnet18", (4,), 1, (435, 32, -217, 224)), ("mobilenet_v2", (4,), 1, (491, 32, -245, 256)),
    ("resnet18", (2, 3), 3, (243, 16, -121, 128)), ("mobilenet_v2", (2, 3), 3, (299, 16, -149, 160))])
def test_receptive_field_matches_the_gradient_of_one_cell(backbone, stages, neighbourhood, expected):
    """The analytic field of the feature map (the last stage, or stages 2 + 3 pooled to stride 16 after a
    3-cell neighbourhood average) equals where the input gradient of one cell is non-zero."""
    torch.manual_seed(0)
    encoder = build_encoder(dense_config().override({"model": {
        "backbone": backbone, "stages": stages, "neighbourhood": neighbourhood}})).eval()
    field = encoder.layout.receptive_field
    assert (field.size, field.stride, field.start, field.halo) == expected
    image = torch.rand(1, 1, 768, 768, requires_grad=True)  # cell 12's field lies inside it for every layout
    encoder.feature_map(image)[0, :, 12, 12].sum().backward()
    rows = image.grad[0, 0].abs().sum(1).nonzero().ravel()
    cols = image.grad[0, 0].abs().sum(0).nonzero().ravel()
    expected = (12 * field.stride + field.start, 12 * field.stride + field.start + field.size - 1)
    assert (rows.min().item(), rows.max().item()) == expected
    assert (cols.min().item(), cols.max().item()) == expected


@pytest.mark.parametrize("size", [(256, 192), (200, 150)])
def test_per_pixel_trunk_dense_equals_exact_and_float64(size):
    """With a per-pixel trunk context cannot matter: dense == exact == the float64 reference."""
    config = dense_config()
    encoder = per_pixel_encoder(config)
    image = texture(size, 0)
    dense, foreground = embed_image(encoder, image, config)
    rows, cols = grid(config.geometry, *size)
    canvas = np.zeros(canvas_shape(*size, config.geometry, config.stride), np.float32)
    canvas[:size[0], :size[1]] = image
    expected = per_pixel_reference(encoder, canvas, rows, cols, 64)
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-5, atol=1e-5)
    exact, exact_foreground = embed_image(encoder, canvas, config.with_mode("exact"))  # same windows, cut one by one
    np.testing.assert_allclose(exact.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(foreground, exact_foreground) and 0 < foreground.sum() < foreground.numel()
    tiled, _ = embed_dense(encoder.feature_map, torch.from_numpy(image), config, tile=64)
    np.testing.assert_allclose(tiled.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone, tile", [("resnet18", 96), ("resnet18", 160), ("mobilenet_v2", 160),
                                           ("resnet18_mid", 96), ("resnet18_mid", 144)])
def test_stitched_tiles_equal_the_whole_image_map(request, backbone, tile):
    encoder = request.getfixturevalue(backbone)
    image = torch.from_numpy(texture((640, 480), 1))
    halo, stride = encoder.layout.halo, encoder.stride
    with torch.inference_mode():
        whole = encoder.feature_map(image[None, None])[0]
        stitched = tiled_feature_map(encoder.feature_map, image, halo, stride, tile)
        short_halo = tiled_feature_map(encoder.feature_map, image, 2 * stride, stride, tile)
    scale = whole.abs().max().item()
    assert (stitched - whole).abs().max().item() < 1e-5 * scale
    assert (short_halo - whole).abs().max().item() > 1e-2 * scale  # the halo is needed: the check can fail


def test_tiles_without_wanted_cells_are_not_run(resnet18):
    image = torch.from_numpy(texture((512, 512), 4))
    wanted = torch.zeros(16, 16, dtype=torch.bool)
    wanted[1:3, 9:12] = True  # cells of one 128 px tile (4 x 4 cells): the first row, third column
    calls = []

    def counting(images):
        calls.append(images.shape)
        return resnet18.feature_map(images)

    with torch.inference_mode():
        whole = resnet18.feature_map(image[None, None])[0]
        partial = tiled_feature_map(counting, image, resnet18.layout.halo, 32, 128, wanted=wanted)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[:4, 8:12] = False  # the one tile run
    assert len(calls) == 1 and (partial[:, outside] == 0).all()
    assert (partial[:, wanted] - whole[:, wanted]).abs().max().item() < 1e-5 * whole.abs().max().item()


@pytest.mark.parametrize("tile, block_rows, skip", [(2048, None, False), (512, 40, False), (704, 96, False),
                                                    (512, None, True)])
def test_streamed_bands_equal_the_image_in_memory(tmp_path, resnet18, tile, block_rows, skip):
    config = dense_config()
    image = texture((700, 530), 2)
    image[:300] = 0  # whole bands of background, and tiles of them
    np.save(tmp_path / "slide.npy", image)
    expected, foreground = embed_image(resnet18, image, config)
    with open_image(tmp_path / "slide.npy") as reader:
        stream = SlideStream(reader, 0, config, block_rows=block_rows)
        streamed = torch.full_like(expected, float("nan"))
        for band in stream.dense_bands(resnet18.feature_map, tile=tile, skip_background=skip):
            if band.embeddings is not None:
                streamed[band.first_row:band.first_row + len(band.foreground)] = band.embeddings
    assert np.array_equal(stream.foreground, foreground.numpy())
    compared = foreground if skip else torch.ones_like(foreground)
    assert (streamed[compared] - expected[compared]).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_native_dense_scores_equal_scoring_in_memory(tmp_path, resnet18):
    config = dense_config()
    bank_images = [texture((256, 192), 10 + i) for i in range(2)]
    embedded = [embed_image(resnet18, image, config) for image in bank_images]
    bank = MemoryBank(torch.stack([e for e, _ in embedded]), torch.stack([f for _, f in embedded]), config,
                      "test", ["a", "b"])
    slide = texture((256, 192), 3)
    np.save(tmp_path / "slide.npy", slide)
    embeddings, foreground = embed_image(resnet18, slide, config)
    with open_image(tmp_path / "slide.npy") as reader:
        for scorer in (GlobalScorer(bank, k=2), AlignedScorer(bank, radius=1)):
            streamed = score_source(SlideStream(reader, 0, config), resnet18, {"s": scorer})["s"]
            expected = scorer.score(embeddings, foreground)
            np.testing.assert_allclose(streamed.window_scores, expected.window_scores, rtol=1e-4,
                                       equal_nan=True)
            assert streamed.scored == int(foreground.sum())


def test_bank_of_one_mode_is_refused_in_the_other(tmp_path):
    config = dense_config()
    bank = MemoryBank(torch.zeros(1, 7, 5, 4), torch.ones(1, 7, 5, dtype=torch.bool), config.with_mode("exact"),
                      "digest", ["a"])
    bank.save(tmp_path / "exact.safetensors")
    with pytest.raises(BankMismatchError, match="geometry.mode: bank 'exact', run 'dense'"):
        MemoryBank.load(tmp_path / "exact.safetensors", config=config)
    bank.save(bank_file(tmp_path, "exact"))
    with pytest.raises(SwsslError, match="no dense-mode memory bank.*--mode dense"):
        MemoryBank.load(tmp_path, config=config)


def test_pixel_map_clips_windows_reaching_into_the_padding():
    scores = np.array([[1.0, 3.0]])
    result = pixel_map(scores, np.array([0]), np.array([0, 32]), 64, (50, 80))
    expected = np.ones((50, 80))
    expected[:, 32:64] = 2.0
    expected[:, 64:] = 3.0
    np.testing.assert_allclose(result, expected)


def save_png(path, image: np.ndarray) -> None:
    Image.fromarray((image * 65535).astype(np.uint16)).save(path)


def test_commands_in_dense_mode(tmp_path):
    """swssl-bank / swssl-eval / swssl-infer --mode dense on a random-weight run; infer equals eval."""
    config = dense_config().with_mode("exact")
    rows = ["path,label,split"]
    for split, count in (("train", 3), ("test", 4)):
        for i in range(count):
            image = texture((256, 192), 20 + i + 10 * (split == "test"))
            save_png(tmp_path / f"{split}-{i}.png", image)
            rows.append(f"{split}-{i}.png,{int(split == 'test' and i % 2)},{split}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoint.pt", build_encoder(config).eval(), None, 0, config, [])
    runner = CliRunner()
    common = ["--device", "cpu", "--mode", "dense"]
    result = runner.invoke(cli.bank, [str(run), "--data", str(tmp_path), *common])
    assert result.exit_code == 0, result.output
    assert bank_file(run, "dense").is_file() and not bank_file(run, "exact").exists()
    result = runner.invoke(cli.evaluate, [str(run), "--data", str(tmp_path), "--scorer", "aligned", *common])
    assert result.exit_code == 0, result.output
    with open(run / "eval-dense" / "test-aligned" / "images.csv", newline="") as handle:
        evaluated = {row["path"].rsplit("/", 1)[-1]: float(row["score"]) for row in csv.DictReader(handle)}
    out = tmp_path / "infer"
    result = runner.invoke(cli.infer, [str(tmp_path / "test-*.png"), "--model", str(run), "--out", str(out),
                                       "--backend", "torch", "--quiet", *common])
    assert result.exit_code == 0, result.output
    with open(out / "scores.csv", newline="") as handle:
        inferred = {row["path"].rsplit("/", 1)[-1]: float(row["score"]) for row in csv.DictReader(handle)}
    assert inferred.keys() == evaluated.keys()
    for name, score in evaluated.items():
        assert inferred[name] == pytest.approx(score, rel=1e-4)
    result = runner.invoke(cli.evaluate, [str(run), "--data", str(tmp_path), "--device", "cpu"])  # exact: no bank
    assert result.exit_code == 1 and "no exact-mode memory bank" in result.output


def test_invalid_dense_geometry_is_one_line_error(tmp_path):
    config = load_preset("small").override({"geometry": {"height": 128, "width": 96, "patch": 32, "step": 16}})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "checkpoint.pt", build_encoder(config), None, 0, config, [])
    result = CliRunner().invoke(cli.bank, [str(tmp_path), "--data", str(tmp_path), "--mode", "dense"])
    assert result.exit_code == 2  # a usage error (swssl.errors)
    assert result.output.startswith("error: dense mode needs patch and step to be multiples")


def test_top_window_is_clipped_to_the_frame():
    """A dense window reaching into the padding is reported within the frame (source pixels, scale 1/2)."""
    scores = np.array([[0.1, 0.2], [0.3, 0.9]], np.float32)
    windows = WindowGrid(np.array([0, 32]), np.array([0, 32]), 64, (2.0, 2.0))
    result = ImageScore(0.9, scores, np.ones((2, 2), bool), windows)
    assert result.top_window((150, 140)) == {"y": 64, "x": 64, "height": 86, "width": 76}
    assert result.top_window((400, 400)) == {"y": 64, "x": 64, "height": 128, "width": 128}
