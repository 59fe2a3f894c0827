"""Training on 2 processes (gloo, CPU) equals one process on the same windows; the real command under torchrun."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swssl.config import build_config
from swssl.model.encoder import build_encoder
from swssl.training.distributed import GlobalBatchNorm, Ranks, wrap
from swssl.training.train import Views, train_step

GLOBAL_BATCH = 8
# The tolerances: float32 sums taken in another order over 2 ranks (and BatchNorm statistics in float32 where
# torch's CPU BatchNorm accumulates in float64) change the loss in its 6th digit. In the weights, most
# elements of the step agree to ~1e-6, but a few move by up to 10 % of their update: near-ties in ReLU and
# max-pooling are broken the other way and route those gradients elsewhere. So each tensor's step is
# compared as a whole: measured 0.1 % of its norm at most with sync_bn, 150 % without; allowed 1 %.
LOSS_RTOL, STEP_RTOL = 1e-5, 1e-2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_differences(weights: dict, before: dict, other: dict) -> dict[str, float]:
    """Per floating tensor: |other - weights| relative to the size of the step |weights - before|."""
    return {name: float((other[name] - value).norm() / max(float((value - before[name]).norm()), 1e-12))
            for name, value in weights.items() if value.is_floating_point()}


def setup(config_file):
    """Encoder and optimizer from the same seed, and one fixed global batch of windows."""
    config = build_config("small", config_file)
    torch.manual_seed(0)
    encoder = build_encoder(config, weights="none").train()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    p = config.geometry.patch
    batch = [torch.rand(GLOBAL_BATCH, 1, p, p, generator=generator) for _ in range(3)]
    batch.append(torch.rand(GLOBAL_BATCH, generator=generator))
    return config, encoder, optimizer, batch


def step(config, encoder, optimizer, batch, ranks=Ranks(), sync_bn=True):
    forward = wrap(Views(encoder), ranks, torch.device("cpu"), sync_bn)
    loss = train_step(forward, optimizer, batch, config.train, torch.device("cpu"), ranks=ranks)
    return loss.total.item(), {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def rank_main(rank, port, config_file, out, sync_bn):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    config, encoder, optimizer, batch = setup(config_file)
    share = GLOBAL_BATCH // 2
    local = [t[rank * share:(rank + 1) * share] for t in batch]
    loss, weights = step(config, encoder, optimizer, local, Ranks(rank, 2, rank), sync_bn)
    if rank == 0:
        torch.save({"loss": loss, "weights": weights}, out)
    dist.destroy_process_group()


def two_ranks(tmp_path, config_file, sync_bn):
    out = tmp_path / f"rank0-{sync_bn}.pt"
    mp.spawn(rank_main, args=(free_port(), config_file, out, sync_bn), nprocs=2, join=True)
    return torch.load(out)


def test_two_ranks_take_the_step_of_one_process_on_the_global_batch(tiny_data, tmp_path):
    config, encoder, optimizer, batch = setup(tiny_data / "tiny.toml")
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    loss, weights = step(config, encoder, optimizer, batch)
    synced = two_ranks(tmp_path, tiny_data / "tiny.toml", sync_bn=True)
    assert synced["loss"] == pytest.approx(loss, rel=LOSS_RTOL)
    assert weights.keys() == synced["weights"].keys()
    differences = step_differences(weights, before, synced["weights"])
    assert max(differences.values()) < STEP_RTOL, sorted(differences.items(), key=lambda kv: kv[1])[-3:]
    # Without the synchronised BatchNorm each rank normalises its own half: another loss and another step.
    local = two_ranks(tmp_path, tiny_data / "tiny.toml", sync_bn=False)
    assert local["loss"] != pytest.approx(loss, rel=1e-3)
    assert max(step_differences(weights, before, local["weights"]).values()) > 10 * STEP_RTOL


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3), torch.nn.BatchNorm1d(3))
    x = torch.rand(5, 1, 8, 8)
    expected = plain(x)
    converted = GlobalBatchNorm.convert(plain)
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[4], GlobalBatchNorm)
    torch.testing.assert_close(converted(x), expected)  # not distributed: the BatchNorm it replaced


def test_a_short_torchrun_run_writes_one_checkpoint_one_log_and_one_bank(tiny_data, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    train = shutil.which("swssl-train", path=os.path.dirname(sys.executable))
    if torchrun is None or train is None:
        pytest.skip("torchrun or swssl-train is not installed beside this Python")
    out = tmp_path / "run"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", train, "--preset", "small", "--config",
               str(tiny_data / "tiny.toml"), "--data", str(tiny_data / "manifest.csv"), "--out", str(out),
               "--epochs", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "bank.safetensors", "best.pt", "checkpoint.pt", "config.json", "train_log.csv", "train_log.png"]
    log = (out / "train_log.csv").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("epoch,")  # one header, one row per epoch: rank 0 alone writes
    assert (done.stdout + done.stderr).count("val AUROC") == 1  # validated once (epoch 2), on rank 0 only
    assert json.loads((out / "config.json").read_text())["train"]["batch_size"] == 8
    resumed = subprocess.run(command[:-4] + ["--resume", "--epochs", "3", "--device", "cpu"], capture_output=True,
                             text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len((out / "train_log.csv").read_text().splitlines()) == 4
