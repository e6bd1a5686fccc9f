"""PyTorch DDP for real: ``torchrun`` starts two ranks (gloo, CPU) running examples/ddp_train.py
over one store with persistent torch workers. Every rank gets as many batches, the ranks'
examples are disjoint slices of the store (digests against numpy's own slices), and a job
stopped mid-epoch and started again with its states gives the rest of that epoch exactly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_store

pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCANS = [
    (f"000000{i}_V00-Aug00", (24, 20, 7), 3, "train", i, 0, 0, np.float32) for i in range(1, 4)
]  # 21 slices: 10 a rank, one left over
BATCH = 2


def _torchrun(store, *args):
    env = {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "examples.ddp_train", str(store), "--batch-size", str(BATCH), *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch process group" not in result.stderr, result.stderr[-3000:]  # the shards match the group
    return result


def _ranks(folder):
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp") / "store"
    truth = build_store(root, scans=SCANS)
    digests = {
        hashlib.sha1(np.ascontiguousarray(image[:, :, z], dtype=np.float32).tobytes()).hexdigest()
        for image, _mask in truth.values()
        for z in range(image.shape[2])
    }
    return root, digests


def test_ranks_read_disjoint_equal_shards_and_resume_exactly(ddp_store, tmp_path):
    store, every_slice = ddp_store
    whole = tmp_path / "whole"
    _torchrun(store, "--epochs", 2, "--workers", 2, "--record", whole)
    ranks = _ranks(whole)
    per_rank = (21 // 2) // BATCH  # drop_last: whole batches of the rank's 10 examples
    assert [r["len"] for r in ranks] == [per_rank, per_rank]
    for epoch in ("0", "1"):
        read = [r["epochs"][epoch] for r in ranks]
        assert [len(d) for d in read] == [per_rank * BATCH] * 2
        assert not set(read[0]) & set(read[1])  # no example on two ranks
        assert set(read[0]) | set(read[1]) <= every_slice  # each one a slice of the store, exact
    assert ranks[0]["epochs"]["0"] != ranks[0]["epochs"]["1"]  # a new order every epoch

    # stopped after 3 batches (epoch 1's first), then started again from the ranks' states
    states = tmp_path / "states"
    _torchrun(store, "--epochs", 2, "--workers", 2, "--state", states, "--stop-after", per_rank + 1)
    assert [json.loads((states / f"rank{r}.json").read_text())["position"] for r in (0, 1)] == [1, 1]
    assert (states / "model.pt").is_file()  # the weights beside the data's position
    resumed = tmp_path / "resumed"
    _torchrun(store, "--epochs", 2, "--workers", 2, "--state", states, "--record", resumed)
    for before, after in zip(ranks, _ranks(resumed), strict=True):
        assert after["epochs"] == {"1": before["epochs"]["1"][BATCH:]}  # the rest of epoch 1, exactly
