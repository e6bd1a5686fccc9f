"""``scancache profile``: a real loader over a real store, for a bounded time."""

from __future__ import annotations

import json

import pytest

from service.cli import main


def test_profile_prints_rates_amplification_and_why(small_store, capsys):
    root, _ = small_store
    args = ["profile", str(root), "--tag", "DefaultDataLoader", "--batch-size", "4", "--seconds", "0.3"]
    assert main([*args, "--categories", "0,1+2", "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "batches/s" in out and "read amplification" in out and "why: " in out

    assert main([*args, "--categories", "[0,[1,2]]", "--split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stats = result["stats"]
    assert result["batches"] >= 1 and result["examples"] >= 4
    assert stats["bytes_delivered"] > 0
    assert abs(stats["read_amplification"] - stats["bytes_read"] / stats["bytes_delivered"]) < 1e-9
    # 2D slices from (40, 36, 8)-deep chunks: more is decoded than delivered
    assert stats["read_amplification"] > 1


def test_profile_patches_over_http(small_store, capsys):
    from tests.live_server import live_server

    root, _ = small_store
    with live_server(root) as url:
        code = main(
            [
                "profile",
                url,
                "--tag",
                "PatchDataLoader",
                "--img-size",
                "16,16,4,1",
                "--seconds",
                "0.3",
                "--json",
            ]
        )
    assert code == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["bytes_read"] > 0 and stats["read_amplification"] >= 1


def test_profile_bad_arguments_are_one_line(small_store, capsys):
    root, _ = small_store
    assert main(["profile", str(root), "--tag", "DefaultDataLoader", "--categories", "0,x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--categories" in err


def _profiled(tag: str, read_s: float, copy_s: float, amplification: float, **extra: object) -> dict:
    """What ``run_profile`` returns for a run with this time split (10 batches of 4 in 2 s)."""
    stats = {"read_s": read_s, "merge_s": 0.0, "copy_s": copy_s, "wait_s": 1.5,
             "read_amplification": amplification, "bytes_read": amplification * 10e6, "bytes_delivered": 10e6}  # fmt: skip
    return {"tag": tag, "batches": 10, "examples": 40, "seconds": 2.0, "batches_per_s": 5.0,
            "examples_per_s": 20.0, "stats": stats, **extra}  # fmt: skip


def test_profile_names_range_requests_for_patches_on_object_storage():
    """The advice follows the run: a patch loader whose reads dominate on s3:// is told what a
    patch costs in range requests and which layout needs fewer; not so on a local store."""
    from service.profile import explain

    result = _profiled(
        "RandomPatchDataLoader", read_s=1.8, copy_s=0.1, amplification=1.2, object_storage=True
    )
    why = explain(result)[-1]
    assert why.startswith("why: read is 95%") and "--chunks 64,64,32" in why and "range requests" in why
    assert "range requests" not in explain({**result, "object_storage": False})[-1]
    assert "range requests" not in explain({**result, "tag": "DefaultDataLoader"})[-1]


def test_profile_advice_for_copies_follows_the_y_format():
    """Copy-bound with one-hot y: class-index y (one uint8 a voxel) is the advice; with
    class-index y already, the workers; and the flag's choices are the loaders' own."""
    from loaders.config import Y_FORMATS
    from service.cli_args import PROFILE_Y_FORMATS
    from service.profile import explain

    assert tuple(PROFILE_Y_FORMATS) == tuple(Y_FORMATS)
    result = _profiled("DefaultDataLoader", read_s=0.6, copy_s=1.2, amplification=0.6)
    why = explain({**result, "y_format": "one_hot"})[-1]
    assert why.startswith("why: copy is 67%") and "Y_FORMAT = 'class_index'" in why and "quarter" in why
    why = explain({**result, "y_format": "class_index"})[-1]
    assert "class_index" not in why and "workers" in why


def test_profile_runs_class_index_y(small_store, capsys):
    root, _ = small_store
    args = ["profile", str(root), "--tag", "DefaultDataLoader", "--batch-size", "4", "--seconds", "0.3"]
    assert main([*args, "--split", "train", "--y-format", "class_index", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["y_format"] == "class_index" and result["examples"] >= 4


def test_profile_refuses_an_unknown_y_format(small_store, capsys):
    import pytest

    root, _ = small_store
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", str(root), "--tag", "DefaultDataLoader", "--y-format", "indices"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--y-format" in err and "class_index" in err


def test_profile_refuses_seconds_and_sizes_it_cannot_run_and_names_the_tag(small_store, capsys):
    import pytest

    root, _ = small_store
    base = ["profile", str(root), "--tag", "DefaultDataLoader"]
    for flag, value, words in (
        ("--seconds", "nan", "must be a finite number more than 0"),
        ("--seconds", "inf", "must be a finite number more than 0"),
        ("--seconds", "0", "must be a finite number more than 0"),
        ("--img-size", "64,64", "give three or four positive integers"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, flag, value])
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err
    assert main(["profile", str(root), "--tag", "Nope", "--seconds", "0.3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("scancache profile: error: --tag 'Nope' is not a loader; the loaders are: ")


def test_profile_advises_patch_loaders_the_layout_that_helps_patches():
    from service.profile import explain

    patches = explain(_profiled("PatchDataLoader", read_s=1.5, copy_s=0.1, amplification=3.8))[-1]
    assert "--layout balanced, or deeper --chunks" in patches and "slices" not in patches
    slices = explain(_profiled("DefaultDataLoader", read_s=1.5, copy_s=0.1, amplification=3.8))[-1]
    assert "--layout slices or balanced" in slices


def test_profile_reads_through_torch_workers_and_reports_each(small_store):
    """``--workers 2``: the loader read as a torch script reads it (DataLoader workers,
    persistent), each worker's figures reported, and the totals are the workers' sums."""
    pytest.importorskip("torch")
    from h5_sources import run_cli

    root, _ = small_store
    args = [
        "profile",
        root,
        "--tag",
        "DefaultDataLoader",
        "--batch-size",
        "2",
        "--seconds",
        "1",
        "--split",
        "train",
    ]
    done = run_cli(*args, "--workers", "2", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    stats, rows = result["stats"], result["stats"]["workers"]
    assert result["workers"] == 2 and sorted(r["worker"] for r in rows) == [0, 1]
    assert all(r["batches"] > 0 and r["cpu_s"] > 0 for r in rows)
    # the totals are the workers' (counted from the window's first batch on)
    assert stats["batches"] == sum(r["batches"] for r in rows) >= 1 and result["batches"] >= 1
    assert stats["bytes_read"] == sum(r["bytes_read"] for r in rows) > 0
    assert stats["read_amplification"] == pytest.approx(stats["bytes_read"] / stats["bytes_delivered"])

    text = run_cli(*args, "--workers", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[3].startswith("2 worker process(es) on ") and "started once" in lines[3]
    assert any(ln.startswith("  worker 0: ") for ln in lines) and any(
        ln.startswith("  worker 1: ") for ln in lines
    )
    assert any(ln.startswith("why: ") for ln in lines) and lines[-1].startswith("within the workers: ")
    assert "--workers: '-1' must be at least 0" in run_cli(*args, "--workers", "-1").stderr


def _with_workers(busy: list[float], main_cpu_s: float, cores: int) -> dict:
    """A 2-second run with workers, each keeping ``busy[i]`` cores busy."""
    rows = [{"worker": i, "batches": 10, "batches_per_s": 5.0, "seconds": 2.0, "cpu_s": 2.0 * b,
             "read_s": 1.0, "copy_s": 0.2} for i, b in enumerate(busy)]  # fmt: skip
    result = _profiled("DefaultDataLoader", read_s=2.0, copy_s=0.4, amplification=0.6)
    result["stats"]["workers"] = rows
    return {**result, "workers": len(busy), "worker_start_s": 0.5, "start_method": "default",
            "main_cpu_s": main_cpu_s, "caller_wait_s": 1.9, "cores": cores}  # fmt: skip


def test_profile_with_workers_says_what_bounds_them():
    """The advice follows the measured CPU: busy workers with idle cores, more workers; every
    core busy, less work per example; a busy training process, fewer bytes; none busy, reads."""
    from service.profile import explain

    def why(result: dict) -> str:
        return next(ln for ln in explain(result) if ln.startswith("why: "))

    assert "try --workers 4" in why(_with_workers([0.95, 0.9], main_cpu_s=0.4, cores=16))
    assert "more workers cannot help" in why(_with_workers([0.95, 0.9], main_cpu_s=0.4, cores=2))
    assert "training process is the bound" in why(_with_workers([0.3, 0.3], main_cpu_s=1.8, cores=16))
    idle = why(_with_workers([0.2, 0.2], main_cpu_s=0.2, cores=64))
    assert "wait on their reads" in idle or "other processes compete" in idle
    served = why({**_with_workers([0.2, 0.2], main_cpu_s=0.2, cores=64), "over_http": True})
    assert "wait on the server" in served or "other processes compete" in served
    lines = explain(_with_workers([0.95, 0.9], main_cpu_s=0.4, cores=16))
    assert "  worker 1: 10 batches, 5.00 batches/s, 0.90 cores busy, read 1.00 s, copy 0.20 s" in lines


def test_a_profile_that_cannot_build_its_loader_says_it_in_flags_and_leaves_nothing_behind(small_store):
    """A failed run left its data set registered ('already registered' on every later run in the
    process) and named it ('dataset scancache-profile: split=...'), not the flag."""
    from service.profile import run_profile

    root, _ = small_store
    for _ in range(2):
        with pytest.raises(ValueError) as info:
            run_profile(str(root), "DefaultDataLoader", seconds=0.1, split="nope")
        assert str(info.value).startswith("--split 'nope' matches no scan (its scans have split ")
    assert (
        run_profile(str(root), "DefaultDataLoader", batch_size=2, seconds=0.1, split="train")["batches"] >= 1
    )


def test_a_batch_larger_than_the_data_set_is_noted_once(small_store, capsys):
    import re

    args = [
        "profile",
        str(small_store[0]),
        "--tag",
        "DefaultDataLoader",
        "--seconds",
        "0.3",
        "--split",
        "train",
    ]
    assert main([*args, "--batch-size", "500", "--json"]) == 0
    captured = capsys.readouterr()
    note = "profile: note: --batch-size 500 is more than the (\\d+) examples of the data set: each batch held those \\1"
    assert re.fullmatch(note, captured.err.strip()), captured.err
    held = int(re.fullmatch(note, captured.err.strip()).group(1))
    result = json.loads(captured.out)  # --json stays one document
    assert result["batches_per_epoch"] == 1 and result["examples"] == held * result["batches"]
    assert main([*args, "--batch-size", "4"]) == 0
    assert "note" not in capsys.readouterr().err
