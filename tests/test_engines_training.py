"""Training engines on tiny synthetic data: the three modes, resume, and 2-process gloo DDP."""

from __future__ import annotations

import csv
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.data import noisy_blocks
from pipeline.data.samples import to_samples
from pipeline.engines import TrainConfig, train
from pipeline.models import load_checkpoint

TINY_NET = {"preset": "custom", "in_channels": 1, "width": 1 / 16, "batch_norm": True,
            "fc_kernel": 3, "dropout": 0.0, "fc_channels": 32}


def _samples(n: int, seed: int, size: int = 32) -> list[dict]:
    items = []
    for i in range(n):
        s = noisy_blocks((size, size), rng=seed + i, n_blocks=2, image_noise=0.3)
        items.append({"image": s.image[None].astype(np.float32), "label": s.truth[None],
                      "id": f"s{seed + i}"})
    return to_samples(items)


def _config(**kw) -> TrainConfig:
    base = {"epochs": 3, "batch_size": 4, "lr": 3e-3, "C": 10.0, "network": TINY_NET}
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data():
    return _samples(12, 0), _samples(4, 100)


@pytest.fixture(scope="module")
def cnn_run(data, tmp_path_factory):
    return train(_config(mode="cnn", epochs=10, lr=1e-2, batch_size=2), *data,
                 tmp_path_factory.mktemp("cnn"))


def test_cnn_mode_learns_and_logs(cnn_run):
    history = cnn_run.history
    assert len(history) == 10
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert cnn_run.best_metric > 0.3
    assert cnn_run.best_metric == max(h["val_jaccard_cnn"] for h in history)
    log = (cnn_run.run_dir / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,train_loss,train_jaccard,val_jaccard_cnn")
    assert len(log) == 11
    assert any((cnn_run.run_dir / "tensorboard").iterdir())
    assert json.loads((cnn_run.run_dir / "config.json").read_text())["mode"] == "cnn"


def test_checkpoints_load_weights_only_and_hold_everything(cnn_run):
    payload = torch.load(cnn_run.last_checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "crf", "working_sets", "epoch", "iteration", "rng",
                "history", "config"):
        assert key in payload
    assert payload["epoch"] == 10 and payload["iteration"] == 60
    assert load_checkpoint(cnn_run.best_checkpoint)["epoch"] == cnn_run.best_epoch


def test_export_model_writes_the_slim_model_a_bundle_ships(cnn_run, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "models" / "cnn.pt"
    assert main(["export-model", str(cnn_run.last_checkpoint), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    slim = torch.load(out, map_location="cpu", weights_only=True)
    full = load_checkpoint(cnn_run.last_checkpoint)
    assert "optimizer" in full and "optimizer" not in slim and "rng" not in slim
    assert slim["config"] == full["config"] and slim["mode"] == "cnn"
    for key, value in full["model"].items():
        assert torch.equal(slim["model"][key], value), key
    assert out.stat().st_size < cnn_run.last_checkpoint.stat().st_size


def test_half_precision_and_shared_network_model_files(data, cnn_run, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.evaluation.runs import predict_samples
    from pipeline.models import load_run

    piecewise = train(_config(mode="piecewise"), *data, tmp_path / "pw",
                      init=cnn_run.last_checkpoint)
    models = tmp_path / "models"
    assert main(["export-model", str(cnn_run.last_checkpoint), str(models / "cnn.pt"),
                 "--half"]) == 0
    assert main(["export-model", str(piecewise.last_checkpoint), str(models / "piecewise.pt"),
                 "--half", "--share-network-with", str(models / "cnn.pt")]) == 0
    raw = torch.load(models / "piecewise.pt", weights_only=True)
    assert "model" not in raw and raw["model_from"] == "cnn.pt"
    assert (models / "piecewise.pt").stat().st_size < 0.2 * (models / "cnn.pt").stat().st_size
    half = torch.load(models / "cnn.pt", weights_only=True)["model"]
    full = load_checkpoint(cnn_run.last_checkpoint)["model"]
    assert half["block1.0.weight"].dtype == torch.float16
    assert (models / "cnn.pt").stat().st_size < 0.6 * cnn_run.last_checkpoint.stat().st_size
    # the shared file loads as a whole model, in the network's own precision
    model, weights, _ = load_run(models / "piecewise.pt")
    assert weights is not None and next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(model.state_dict()["block1.0.weight"],
                               full["block1.0.weight"], rtol=1e-3, atol=1e-4)
    cnn_masks, _ = predict_samples(load_run(cnn_run.last_checkpoint)[0], None, data[1])
    half_masks, _ = predict_samples(load_run(models / "cnn.pt")[0], None, data[1])
    assert (cnn_masks != half_masks).mean() < 0.01
    # a network that differs is refused; a tampered or missing sibling is named
    capsys.readouterr()
    assert main(["export-model", str(piecewise.last_checkpoint), str(models / "other.pt"),
                 "--share-network-with", str(models / "cnn.pt")]) == 2  # not --half: differs
    assert "differ from" in capsys.readouterr().err
    torch.save({**torch.load(models / "cnn.pt", weights_only=True), "epoch": -1},
               models / "cnn.pt")
    with pytest.raises(ValueError, match=r"piecewise\.pt: cnn\.pt has sha256"):
        load_checkpoint(models / "piecewise.pt")
    (models / "cnn.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"cnn\.pt, which is missing"):
        load_checkpoint(models / "piecewise.pt")


def test_piecewise_keeps_the_cnn_frozen_and_learns_a_crf(data, cnn_run, tmp_path):
    result = train(_config(mode="piecewise"), *data, tmp_path, init=cnn_run.last_checkpoint)
    before = load_checkpoint(cnn_run.last_checkpoint)["model"]
    after = load_checkpoint(result.last_checkpoint)["model"]
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert result.weights is not None and result.weights.w1 > 0
    row = result.history[0]
    assert row["gamma"] > 0 and "val_jaccard_crf" in row


def test_joint_training_lowers_gamma_over_epochs(data, cnn_run, tmp_path):
    result = train(_config(mode="joint", epochs=4, lr=1e-3), *data, tmp_path,
                   init=cnn_run.last_checkpoint)
    gammas = [row["gamma"] for row in result.history]
    assert gammas[-1] < gammas[0], gammas
    payload = load_checkpoint(result.last_checkpoint)
    assert payload["crf"] == pytest.approx(result.weights.as_array().tolist())
    assert len(payload["working_sets"]) == 12  # every training image has a working set
    # the weights reported with the best epoch are best.pt's, not the last epoch's
    assert load_checkpoint(result.best_checkpoint)["crf"] == pytest.approx(
        result.best_weights.as_array().tolist())


def test_resume_ends_exactly_like_an_uninterrupted_run(data, cnn_run, tmp_path):
    straight = train(_config(mode="joint", epochs=3), *data, tmp_path / "straight",
                     init=cnn_run.last_checkpoint)
    # "killed" after epoch 2: the run folder holds epoch 2's last.pt, then it is resumed
    train(_config(mode="joint", epochs=2), *data, tmp_path / "resumed",
          init=cnn_run.last_checkpoint)
    resumed = train(_config(mode="joint", epochs=3), *data, tmp_path / "resumed",
                    init=cnn_run.last_checkpoint, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    a = load_checkpoint(straight.last_checkpoint)
    b = load_checkpoint(resumed.last_checkpoint)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["crf"] == b["crf"]
    assert straight.history[-1]["gamma"] == resumed.history[-1]["gamma"]


def test_cosine_lr_schedule_follows_torch_cosine_annealing(data, tmp_path):
    result = train(_config(mode="cnn", epochs=4, lr=1e-2, lr_schedule="cosine"), *data,
                   tmp_path)
    oracle_net = torch.nn.Linear(1, 1)
    optimiser = torch.optim.SGD(oracle_net.parameters(), lr=1e-2)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=4)
    expected = []
    for _ in range(4):
        expected.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        annealing.step()
    assert [h["lr"] for h in result.history] == pytest.approx(expected, rel=1e-12)
    with (tmp_path / "log.csv").open() as f:
        logged = [float(row["lr"]) for row in csv.DictReader(f)]
    assert logged == pytest.approx(expected, rel=1e-12)
    # the optimiser really trained at the scheduled rate (its state is in the checkpoint)
    groups = load_checkpoint(result.last_checkpoint)["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(expected[-1], rel=1e-12)
    assert expected[-1] < expected[0] / 5


def test_resumed_run_appends_to_an_older_log_in_its_own_columns(data, cnn_run, tmp_path):
    train(_config(mode="cnn", epochs=1), *data, tmp_path)
    log = tmp_path / "log.csv"
    lines = log.read_text().splitlines()
    old = [",".join(line.split(",")[:-1]) for line in lines]  # a log written before "lr"
    log.write_text("\n".join(old) + "\n")
    train(_config(mode="cnn", epochs=2), *data, tmp_path, resume=True)
    with log.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == old[0].split(",") and len(rows) == 3
    assert all(len(row) == len(rows[0]) for row in rows)


def test_bad_settings_are_refused(data, tmp_path):
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainConfig(mode="crf")
    with pytest.raises(ValueError, match="unknown training settings: lr_rate"):
        TrainConfig.from_dict({"lr_rate": 1})
    mixed = data[0][:2] + _samples(1, 50, size=40)
    with pytest.raises(ValueError, match="training images differ in size"):
        train(_config(), mixed, [], tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(_config(mode="joint"), *data, tmp_path, init=tmp_path / "nope.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, init: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train_set, val_set = _samples(12, 0), _samples(4, 100)
        result = train(_config(mode="joint", epochs=2), train_set, val_set, out, init=init)
        params = torch.cat([p.detach().flatten() for p in
                            load_checkpoint(init)["model"].values()]).sum().item()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"w": result.weights.as_array().tolist(), "history": result.history,
                       "init_sum": params}, f)
    finally:
        torch.distributed.destroy_process_group()


def _shutdown_worker(rank: int, world: int, port: int, out: str) -> None:
    import time

    from pipeline import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    assert distributed.init_from_env()
    assert distributed.all_gather_objects(rank) == [0, 1]
    if rank == 0:
        time.sleep(1.0)  # rank 0 still writing its last checkpoint when rank 1 leaves
    distributed.shutdown()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"left": time.time(), "initialized": torch.distributed.is_initialized()}, f)


def test_distributed_shutdown_lets_each_rank_leave_when_done(tmp_path):
    from pipeline import distributed

    distributed.shutdown()  # not distributed: a no-op
    mp.spawn(_shutdown_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["left"] < r0["left"]  # nobody waits for the slow rank, and nobody aborts
    assert not r0["initialized"] and not r1["initialized"]


def test_two_gloo_processes_hold_the_same_crf(cnn_run, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), str(cnn_run.last_checkpoint)),
             nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["w"] == r1["w"]
    assert [h["gamma"] for h in r0["history"]] == [h["gamma"] for h in r1["history"]]
    assert (tmp_path / "last.pt").exists()
    payload = load_checkpoint(tmp_path / "last.pt")
    assert len(payload["working_sets"]) <= 12  # rank 0 keeps its own shard's sets
    assert payload["crf"] == pytest.approx(r0["w"])


def _piecewise_worker(rank: int, world: int, port: int, out: str, init: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # odd counts: a DistributedSampler would pad both sets with a repeated sample
        train(_config(mode="piecewise"), _samples(11, 0), _samples(5, 100), out, init=init)
    finally:
        torch.distributed.destroy_process_group()


def _mean_crf_jaccard(checkpoint, samples) -> float:
    from pipeline.crf import map_labelling
    from pipeline.metrics import compute_jaccard
    from pipeline.models import load_run, predict_map_arrays

    model, weights, config = load_run(checkpoint)
    images = torch.as_tensor(np.stack([s["image"] for s in samples]))
    probs, _ = predict_map_arrays(model, images)
    masks = np.stack([map_labelling(p, x, weights, connectivity=config["connectivity"])
                      for p, x in zip(probs, images.numpy(), strict=True)])
    truth = np.stack([s["label"][0] for s in samples]).astype(np.uint8)
    return float(np.nanmean(compute_jaccard(masks, truth)))


def test_two_gloo_processes_see_each_sample_once_in_piecewise_and_validation(cnn_run,
                                                                            tmp_path):
    init = str(cnn_run.last_checkpoint)
    mp.spawn(_piecewise_worker, args=(2, _free_port(), str(tmp_path / "ddp"), init),
             nprocs=2, join=True)
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    alone = train(_config(mode="piecewise"), _samples(11, 0), _samples(5, 100),
                  tmp_path / "alone", init=init)
    # the QP had the 11 samples once each, in the order of their ids (so whatever the
    # shuffle and the ranks), not 12 with one twice
    repeat = [dict(_samples(1, 0)[0], id="s0 again")]  # what the padding would have added
    padded = train(_config(mode="piecewise"), _samples(11, 0) + repeat, _samples(5, 100),
                   tmp_path / "padded", init=init)
    w_alone = alone.weights.as_array()
    np.testing.assert_allclose(ddp["crf"], w_alone, rtol=0, atol=1e-9)
    assert np.abs(padded.weights.as_array() - w_alone).max() > 1e-4
    # the logged validation Jaccard is the mean over the 5 validation images
    logged = ddp["history"][-1]["val_jaccard_crf"]
    assert logged == pytest.approx(_mean_crf_jaccard(tmp_path / "ddp" / "last.pt",
                                                     _samples(5, 100)), abs=1e-12)
    with_repeat = _samples(5, 100) + _samples(1, 100)
    assert abs(logged - _mean_crf_jaccard(tmp_path / "ddp" / "last.pt", with_repeat)) > 1e-6


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_uninterrupted_result(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "mmcrf")
    args = ["train", "--mode", "cnn", "--data", "demo", "--root", str(tmp_path / "data"),
            "--size", "32", "--epochs", "4"]
    done = subprocess.run([exe, *args, "--out", str(tmp_path / "straight")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    victim = subprocess.Popen([exe, *args, "--out", str(tmp_path / "killed")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:  # epoch 1 checkpointed
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # the kill may hit a checkpoint write: the temporary file is left, the checkpoint is whole
    epoch_at_kill = load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"]
    assert epoch_at_kill < 4
    resumed = subprocess.run([exe, *args, "--out", str(tmp_path / "killed"), "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert b["epoch"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["epoch"] for r in b["history"]] == [1, 2, 3, 4]
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # the resumed run cleaned up


@pytest.mark.slow
def test_torchrun_cli_trains_on_a_given_data_folder(tmp_path):
    # real (not generated) data under torchrun: no rank may try to generate it
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.data.phantoms import write_horse_like_set

    root = write_horse_like_set(tmp_path / "photos", n_training=4, n_validation=2, seed=3)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nnodes=1", "--nproc_per_node=2",
                           "-m", "pipeline.cli", "train", "--mode", "cnn", "--data", "horse",
                           "--root", str(root), "--size", "32", "--epochs", "1",
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
