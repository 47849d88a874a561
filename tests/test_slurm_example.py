"""The Slurm examples (docs/slurm/*.sbatch) run for real with two local launchers standing
in for two nodes: a stand-in ``srun`` starts the script's command once per "node" with the
variables Slurm sets, and torchrun's c10d rendezvous joins them into one job."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import write_cta_phantom
from pipeline.data.phantoms import write_horse_like_set
from pipeline.models import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
#: Stands in for Slurm's srun: one copy of the command per node, SLURM_NODEID/PROCID set.
SRUN = """#!/usr/bin/env bash
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbatch(script: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "MMCRF_PROCS_PER_NODE": "1",
           "MMCRF_PYTHON": sys.executable, "MMCRF_DEVICE": "cpu", **variables}
    return subprocess.run(["bash", str(REPO / "docs" / "slurm" / script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_multi_node_training_script_trains_across_two_nodes(tmp_path):
    root = write_horse_like_set(tmp_path / "photos", n_training=4, n_validation=2, seed=3)
    run = _sbatch("train_multinode.sbatch", tmp_path, MMCRF_MODE="cnn", MMCRF_DATA="horse",
                  MMCRF_ROOT=str(root), MMCRF_OUT=str(tmp_path / "run"),
                  MMCRF_EXTRA="--size 32 --epochs 1")
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["epoch"] == 1


@pytest.mark.slow
def test_the_sharded_inference_script_splits_the_cases_over_the_nodes(tmp_path):
    src = tmp_path / "scans"
    for k, name in enumerate(("a", "b", "c")):
        made = write_cta_phantom(tmp_path / "made", name, rng=20 + k, shape=(40, 36, 20),
                                 dicom=False)
        src.mkdir(exist_ok=True)
        shutil.copy(made["image"], src / f"{name}.nii.gz")
    model = REPO / "bundles" / "cta_pericardium_crf" / "models" / "phantom_model_axial.pt"
    run = _sbatch("infer_sharded.sbatch", tmp_path, MMCRF_MODEL=str(model),
                  MMCRF_INPUT=str(src), MMCRF_OUTPUT=str(tmp_path / "masks"),
                  MMCRF_WORKERS="0")
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "masks" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == ["a", "b", "c"]
    assert all(r["status"] == "ok" for r in rows)
    # each rank wrote its own shard's summary before rank 0 merged them
    assert sorted(p.name for p in (tmp_path / "masks").glob("summary.rank*.csv")) == [
        "summary.rank0.csv", "summary.rank1.csv"]
