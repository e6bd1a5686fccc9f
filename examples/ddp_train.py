"""Data-parallel training with PyTorch DDP, each rank reading its own shard of a scancache store.

    KERAS_BACKEND=torch torchrun --nproc_per_node 2 -m examples.ddp_train STORE_OR_URL --epochs 2

One process per GPU (CUDA and NCCL when present, else CPU and gloo). What matters:

* ``num_replicas=world, rank=rank`` and one ``SEED`` on every rank: each rank reads a disjoint,
  equally long share of every epoch (the ``n % world`` examples left over are skipped, different
  ones each epoch), so DDP's all-reduce never waits for a rank with one batch more;
* ``ds.set_epoch(epoch)`` on the dataset before each epoch (the loader's own ``set_epoch`` works
  too); persistent workers are started once;
* a state per rank, ``ds.state_dict(batches_done=...)``, beside the model's and optimizer's
  (``model.pt``, written by rank 0): a restarted job resumes exactly, data and weights;
* the training split only (``--split``), and one torch seed: every rank starts from the same
  weights, and two runs from the same seed start alike.

Which examples a rank reads, in which order, is a pure function of (SEED, epoch, rank, workers):
keep ``--workers`` the same when resuming a run whose order you compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from loaders import Config, DatasetCatalog, build_loader, open_source  # before torch and keras


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a store folder, s3://BUCKET/PREFIX or a server URL")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="torch DataLoader workers per rank")
    parser.add_argument("--seed", type=int, default=7, help="the same on every rank")
    parser.add_argument("--split", default="train", help="the scans' split to train on (default: train)")
    parser.add_argument("--state", type=Path, help="folder of the ranks' loader states (resumed from)")
    parser.add_argument("--stop-after", type=int, help="save the state and stop after this many batches")
    parser.add_argument(
        "--record", type=Path, help="write a digest of each example each rank read (JSON per rank)"
    )
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    DatasetCatalog.register("train", args.data, split=args.split)
    first = open_source(args.data).list_scans(split=args.split)[0]
    cfg = Config(TAG="DefaultDataLoader", SEED=args.seed, IMG_SIZE=(*first.shape[:2], 1))
    train = build_loader(
        cfg, "train", batch_size=args.batch_size, is_test=False, shuffle=True, drop_last=True,
        num_replicas=world, rank=rank,
    )  # fmt: skip
    ds = train.as_torch_dataset(channels_first=True)
    batches = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=cuda
    )
    channels = train.num_classes()
    torch.manual_seed(args.seed)  # the same initial weights on every rank, and in every run
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, channels, 1)
    ).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # as x is laid out
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)

    state_file = args.state / f"rank{rank}.json" if args.state else None
    weights = args.state / "model.pt" if args.state else None
    start, resumed = 0, state_file is not None and state_file.is_file()
    if resumed and state_file is not None and weights is not None:
        state = json.loads(state_file.read_text())
        ds.load_state_dict(state)  # the batches still to come, exactly
        start = state["epoch"]
        saved = torch.load(weights, map_location=device)  # where the stopped run's weights were
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    seen: dict[str, list[str]] = {}
    taken = 0
    for epoch in range(start, args.epochs):
        if epoch > start or not resumed:  # a resumed epoch goes on where its state says
            ds.set_epoch(epoch)
        done = 0
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done, taken = done + 1, taken + 1
            if args.record is not None:  # a digest of each example's image, to check the shards
                seen.setdefault(str(epoch), []).extend(_digest(e[0]) for e in x.cpu().numpy())
            if args.stop_after is not None and taken == args.stop_after and state_file is not None:
                state_file.parent.mkdir(parents=True, exist_ok=True)
                state_file.write_text(json.dumps(ds.state_dict(batches_done=done)))
                if rank == 0 and weights is not None:  # the same weights on every rank after a step
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, weights)
                break
        else:
            if rank == 0:
                print(f"epoch {epoch}: {done} batches a rank, loss {loss.item():.4f}", flush=True)
            continue
        break  # stopped after --stop-after batches
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / f"rank{rank}.json").write_text(json.dumps({"len": len(train), "epochs": seen}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
