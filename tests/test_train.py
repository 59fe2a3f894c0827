"""Training: the loss goes down on a fixed batch; checkpoints round-trip; resume equals a straight run."""
import numpy as np
import pytest
import torch
from PIL import Image

from swssl.model.checkpoint import load_checkpoint, load_encoder, weights_digest
from swssl.config import load_preset
from swssl.model.encoder import build_encoder
from swssl.training.triplets import WindowTriplets
from swssl.training.train import Views, train, train_step

SMALL = {"geometry": {"height": 256, "width": 192, "patch": 64, "step": 16},
         "train": {"batch_size": 8, "windows_per_image": 4, "workers": 0, "val_every": 1}}


def small_config(**train):
    return load_preset("small").override(SMALL).override({"train": train})


def mammo_like(rng, size=(300, 220)):
    """A bright blob with texture on a black background, 16-bit."""
    y, x = np.mgrid[:size[0], :size[1]]
    body = ((y - size[0] / 2) / (size[0] / 2.2)) ** 2 + (x / (size[1] * 0.9)) ** 2 < 1
    texture = 0.4 + 0.3 * rng.random(size)
    return np.where(body, texture, 0) * 65535


@pytest.fixture(scope="module")
def chest_layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("chest")
    rng = np.random.default_rng(0)
    (root / "train" / "0.normal").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(mammo_like(rng).astype(np.uint16)).save(root / "train" / "0.normal" / f"{i}.png")
    return root


def test_steps_lower_the_loss_on_a_fixed_batch():
    config = small_config()
    rng = np.random.default_rng(1)
    images = [mammo_like(rng, (256, 192)).astype(np.float32) / 65535 for _ in range(2)]
    dataset = WindowTriplets([lambda i=i: i for i in images], ["a", "b"], config)
    torch.manual_seed(0)
    batch = [torch.stack(items) for items in zip(*(dataset[i] for i in range(16)))]
    encoder = build_encoder(config)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1e-3, momentum=0.9)
    losses = [train_step(Views(encoder), optimizer, batch, config.train, torch.device("cpu")).total.item()
              for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_round_trip_and_resume(chest_layout, tmp_path):
    straight = tmp_path / "straight"
    train(small_config(epochs=3), chest_layout, straight)
    state = load_checkpoint(straight)
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert state["config"].geometry.patch == 64 and state["optimizer"] is not None
    encoder, config = load_encoder(straight)
    assert config == small_config(epochs=3)
    assert weights_digest(encoder) == weights_digest(load_encoder(straight / "checkpoint.pt")[0])

    resumed = tmp_path / "resumed"
    train(small_config(epochs=2), chest_layout, resumed)
    assert load_checkpoint(resumed)["epoch"] == 2
    train(small_config(epochs=2), chest_layout, resumed, resume=True, epochs=3)
    again = load_checkpoint(resumed)
    assert again["epoch"] == 3
    for name, tensor in state["model"].items():
        assert torch.allclose(tensor.float(), again["model"][name].float(), atol=1e-6), name
    log = (resumed / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,loss") and len(log) == 4


def test_corrupt_checkpoint_is_refused(tmp_path):
    from swssl.errors import CheckpointError
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_a_flipped_bit_in_a_checkpoint_is_refused(tmp_path):
    """torch.load checks no checksum: without the digest saved beside the weights, a flipped bit would
    load as other weights (and a bank or export would only say that the weights differ)."""
    from swssl.model.checkpoint import save_checkpoint
    from swssl.errors import CheckpointError

    config = small_config()
    encoder = build_encoder(config).eval()
    save_checkpoint(tmp_path / "checkpoint.pt", encoder, None, 0, config, [])
    assert load_checkpoint(tmp_path)["weights_digest"] == weights_digest(encoder)
    data = bytearray((tmp_path / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the tensor data (most of the file)
    (tmp_path / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        load_checkpoint(tmp_path)


def test_zero_epochs_keeps_the_initialisation_as_a_baseline_run(chest_layout, tmp_path):
    """--epochs 0: no step is taken; the run holds the seeded initialisation, a config and its bank."""
    from swssl.scoring.bank import MemoryBank

    run = train(small_config(epochs=0), chest_layout, tmp_path / "baseline")
    encoder, config = load_encoder(run)
    torch.manual_seed(config.train.seed)
    assert weights_digest(encoder) == weights_digest(build_encoder(config).eval())
    assert load_checkpoint(run)["epoch"] == 0 and not (tmp_path / "baseline" / "train_log.csv").exists()
    assert MemoryBank.load(tmp_path / "baseline", config=config, encoder_digest=weights_digest(encoder))
