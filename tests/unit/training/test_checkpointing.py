"""Distributed checkpoint (torch_dist) in one process: round trips and bitwise resume (fp32 and
bf16 master weights), load options, the save protocol (simulated crash, tracker that never moves
backwards), the save lock, fallback to the previous checkpoint, the hf_io start and export."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.training import checkpoint_lock, checkpointing as ckpt
from tests.unit.training.checkpoint_testlib import (
    build, opt_equal, save, snapshot, states_equal, tiny_config, train_steps,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Checkpoint at iteration 2 plus the uninterrupted continuation (steps 2, 3)."""
    root = tmp_path_factory.mktemp("ckpt")
    model, opt, state = build()
    train_steps(model, opt, range(2))
    save(root, 2, model, opt, state)
    saved = {"model": snapshot(model), "opt": opt.state_dict()}
    losses = train_steps(model, opt, range(2, 4))
    return {"root": root, "saved": saved, "losses": losses, "final": snapshot(model)}


def test_layout_of_the_directory(trained):
    names = sorted(os.listdir(trained["root"]))
    assert names == ["iter_0000002", ckpt.TRACKER_NAME]
    it = Path(trained["root"]) / "iter_0000002"
    assert sorted(p.name for p in it.iterdir()) == ["common.json", "index.json", "rank_00000.bin", "rng", "saver.json"]
    index = json.loads((it / "index.json").read_text())["index"]
    # Padding rows of the vocabulary (64 rows, 61 logical) are not stored; no pickle anywhere.
    assert index["tensors"]["model/embedding.weight"]["shape"] == [61, 32]
    assert index["tensors"]["optim/output_layer.weight/exp_avg"]["shape"] == [61, 32]
    assert index["tensors"]["model/layers.0.mlp.gate_up_proj.weight"]["shape"] == [2, 48, 32]
    assert not any(p.suffix in (".pt", ".distcp", ".pkl") or p.name == ".metadata" for p in it.rglob("*"))


def test_roundtrip_and_bitwise_resume(trained):
    model, opt, state = build(seed=99)
    out = ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state)
    assert out == {"iteration": 2, "consumed_samples": {"train": 8}, "scheduler_state": {"lr_step": 2}, "args": None,
                   "path": str(Path(trained["root"]) / "iter_0000002")}
    states_equal(snapshot(model), trained["saved"]["model"])
    opt_equal(opt.state_dict(), trained["saved"]["opt"])
    assert train_steps(model, opt, range(2, 4)) == trained["losses"]
    states_equal(snapshot(model), trained["final"])


def test_bf16_master_weights_round_trip(tmp_path):
    model, opt, state = build(bf16=True)
    train_steps(model, opt, range(2))
    save(tmp_path, 2, model, opt, state)
    want_opt, want_model = opt.state_dict(), snapshot(model)
    want = train_steps(model, opt, range(2, 4))
    fresh, fopt, fstate = build(seed=5, bf16=True)
    ckpt.load_checkpoint(str(tmp_path), [fresh], fopt, None, fstate)
    states_equal(snapshot(fresh), want_model)
    opt_equal(fopt.state_dict(), want_opt)  # the fp32 masters, not the bf16 weights, were restored
    assert train_steps(fresh, fopt, range(2, 4)) == want
    # bf16 checkpoint -> fp32 model: the weights are the exact fp32 masters, not their bf16 rounding.
    model32, opt32, state32 = build(seed=8)
    ckpt.load_checkpoint(str(tmp_path), [model32], opt32, None, state32)
    for name, p in model32.named_parameters():
        rows = 61 if name in ("embedding.weight", "output_layer.weight") else None
        assert torch.equal(p.detach()[:rows], want_opt["params"][0][name]["master"][:rows]), name
    assert not torch.equal(model32.layers["0"].input_layernorm.weight.detach(),
                           want_model["layers.0.input_layernorm.weight"].float())
    # fp32 checkpoint -> bf16 model: masters are the fp32 weights themselves (read from the model tensors)
    model32, opt32, state32 = build()
    train_steps(model32, opt32, range(1))
    save(tmp_path / "fp32", 1, model32, opt32, state32)
    ckpt.load_checkpoint(str(tmp_path / "fp32"), [fresh], fopt, None, fstate)
    for name, p in model32.named_parameters():
        assert torch.equal(fopt.state_dict()["params"][0][name]["master"], p.detach()), name


def test_rng_restored(tmp_path):
    model, opt, state = build()
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    save(tmp_path, 1, model, opt, state)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    torch.manual_seed(0)
    ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state, load_rng=False)
    assert not torch.equal(torch.rand(3), want[0])


def test_no_load_optim_finetune_and_weights_only_save(trained, tmp_path):
    model, opt, state = build(seed=99)
    fresh = opt.state_dict()
    out = ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state, load_optim=False)
    assert out["iteration"] == 2 and out["scheduler_state"] is None
    states_equal(snapshot(model), trained["saved"]["model"])
    opt_equal(opt.state_dict(), fresh)
    model, opt, state = build(seed=98)
    out = ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state, finetune=True)
    assert out["iteration"] == 0 and out["consumed_samples"] == {} and out["scheduler_state"] is None
    states_equal(snapshot(model), trained["saved"]["model"])
    assert opt.state_dict()["step"] == 0
    # Saved without optimizer state: loading the optimizer is refused, --no-load-optim works.
    ckpt.save_checkpoint(str(tmp_path), 3, [model], None, None, None, state, None)
    assert ckpt.verify_checkpoint(str(tmp_path))["optimizer_tensors"] == 0
    with pytest.raises(ckpt.CheckpointError, match="without optimizer state"):
        ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state)
    assert ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state, load_optim=False)["iteration"] == 3


def test_no_checkpoint_returns_none(tmp_path):
    model, opt, state = build()
    assert ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state) is None
    assert ckpt.load_checkpoint(str(tmp_path / "absent"), [model], opt, None, state) is None


def test_model_mismatch_is_named(trained):
    model, opt, state = build(config=tiny_config(hidden_size=64))
    with pytest.raises(ckpt.CheckpointError, match=r"index\.json: model/.* has shape .*iteration 2"):
        ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state)
    model, opt, state = build(config=tiny_config(num_layers=4))
    with pytest.raises(ckpt.CheckpointError, match=r"lacks 1\d tensors this model holds.*layers\.3"):
        ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state)


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    model, opt, state = build()
    save(tmp_path, 2, model, opt, state)
    before = snapshot(model)
    train_steps(model, opt, range(1))
    real_replace = os.replace

    def crash(src, dst):
        if ".tmp-" in str(src) and os.path.basename(str(dst)).startswith("iter_"):
            raise KeyboardInterrupt("killed during save")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4, model, opt, state)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / ckpt.TRACKER_NAME).read_text() == "2"
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # stale temp dir left behind
    assert ckpt.verify_checkpoint(str(tmp_path))["iteration"] == 2
    fresh, fopt, fstate = build(seed=5)
    assert ckpt.load_checkpoint(str(tmp_path), [fresh], fopt, None, fstate)["iteration"] == 2
    states_equal(snapshot(fresh), before)
    save(tmp_path, 4, model, opt, state)  # the next save cleans its own stale temp dir
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())
    assert (tmp_path / ckpt.TRACKER_NAME).read_text() == "4"


def test_tracker_never_moves_backwards_unless_asked(tmp_path):
    model, opt, state = build()
    save(tmp_path, 100, model, opt, state)
    with pytest.raises(ckpt.CheckpointError, match="says iteration 100; saving iteration 3 would move it backwards"):
        save(tmp_path, 3, model, opt, state)
    assert ckpt.read_tracker(str(tmp_path)) == 100 and not (tmp_path / "iter_0000003").exists()
    save(tmp_path, 100, model, opt, state)  # re-saving the same iteration is fine
    save(tmp_path, 3, model, opt, state, allow_tracker_rewind=True)
    assert ckpt.read_tracker(str(tmp_path)) == 3 and (tmp_path / "iter_0000100").is_dir()


def test_fallback_to_previous_only_when_asked(tmp_path):
    model, opt, state = build()
    train_steps(model, opt, range(1))
    save(tmp_path, 1, model, opt, state)
    at_one = snapshot(model)
    train_steps(model, opt, range(1, 2))
    save(tmp_path, 2, model, opt, state)
    data = tmp_path / "iter_0000002" / "rank_00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    fresh, fopt, fstate = build(seed=3)
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00000\.bin: checksum mismatch .*iteration 2"):
        ckpt.load_checkpoint(str(tmp_path), [fresh], fopt, None, fstate)
    with pytest.warns(UserWarning, match="falling back"):
        out = ckpt.load_checkpoint(str(tmp_path), [fresh], fopt, None, fstate, fallback_to_previous=True)
    assert out["iteration"] == 1 and out["path"].endswith("iter_0000001")
    states_equal(snapshot(fresh), at_one)
    # A tracker naming a missing iteration: the error without fallback, the previous one with it.
    (tmp_path / ckpt.TRACKER_NAME).write_text("7")
    with pytest.raises(ckpt.CheckpointError, match="names iteration 7"):
        ckpt.load_checkpoint(str(tmp_path), [fresh], fopt, None, fstate)
    with pytest.warns(UserWarning):
        assert ckpt.load_checkpoint(str(tmp_path), [fresh], fopt, None, fstate, fallback_to_previous=True)["iteration"] == 1
    # Nothing loadable at all: one error listing every attempt.
    for it in (1,):
        (tmp_path / f"iter_{it:07d}" / "index.json").write_text("{}")
    (tmp_path / ckpt.TRACKER_NAME).write_text("2")
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError, match=r"no checkpoint loads: .*iter_0000002.*\|.*iter_0000001"):
        ckpt.load_checkpoint(str(tmp_path), [fresh], fopt, None, fstate, fallback_to_previous=True)


# ---- the save lock -----------------------------------------------------------------------------------
def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _record(pid, host=None, token="t0"):
    return json.dumps({"host": host or checkpoint_lock.identity()["host"], "pid": pid,
                       "start": checkpoint_lock._start_time(pid), "token": token, "since": "earlier"})


def test_save_lock_refuses_a_second_job_and_takes_over_stale_locks(tmp_path):
    lock = ckpt.acquire_save_lock(str(tmp_path))
    assert (tmp_path / "save.lock").is_file()
    assert ckpt.acquire_save_lock(str(tmp_path)) is lock  # re-entrant in the owning process
    ckpt.release_save_lock(lock)
    assert not (tmp_path / "save.lock").exists()

    live = _sleeper()
    try:
        (tmp_path / "save.lock").write_text(_record(live.pid))
        with pytest.raises(ckpt.CheckpointError, match=rf"locked by another job \(host .*, pid {live.pid}, since earlier\).*--ckpt-force-unlock"):
            ckpt.acquire_save_lock(str(tmp_path))
        model, opt, state = build()
        with pytest.raises(ckpt.CheckpointError, match=f"pid {live.pid}.*refusing to save"):
            save(tmp_path, 1, model, opt, state)
        forced = ckpt.acquire_save_lock(str(tmp_path), force=True)  # the documented override
        assert json.loads((tmp_path / "save.lock").read_text())["pid"] == os.getpid()
        ckpt.release_save_lock(forced)
    finally:
        live.kill()
        live.wait()
    # The same record now names a dead process on this host: stale, taken over.
    (tmp_path / "save.lock").write_text(_record(live.pid))
    lock = ckpt.acquire_save_lock(str(tmp_path))
    assert json.loads((tmp_path / "save.lock").read_text())["token"] == lock.token
    ckpt.release_save_lock(lock)
    # Another host cannot be checked from here: refused.
    (tmp_path / "save.lock").write_text(_record(12345, host="elsewhere.example"))
    with pytest.raises(ckpt.CheckpointError, match="host elsewhere.example"):
        ckpt.acquire_save_lock(str(tmp_path))


def test_cleanup_touches_only_leftovers_that_cannot_be_running(tmp_path):
    model, opt, state = build()
    save(tmp_path, 1, model, opt, state)
    live, dead = _sleeper(), _sleeper()
    dead.kill()
    dead.wait()
    try:
        for name, pid in (("iter_0000005.tmp-live", live.pid), ("iter_0000005.tmp-dead", dead.pid)):
            (tmp_path / name).mkdir()
            (tmp_path / name / "saver.json").write_text(_record(pid))
        (tmp_path / "iter_0000006.tmp-unknown").mkdir()  # no owner record
        with pytest.warns(UserWarning, match="another running process"):
            save(tmp_path, 2, model, opt, state)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert "iter_0000005.tmp-live" in names and "iter_0000006.tmp-unknown" in names
        assert "iter_0000005.tmp-dead" not in names
        # Under the lock nobody else may save here: unknown leftovers go, a live writer's stay.
        lock = ckpt.acquire_save_lock(str(tmp_path))
        with pytest.warns(UserWarning):
            save(tmp_path, 3, model, opt, state)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert "iter_0000006.tmp-unknown" not in names and "iter_0000005.tmp-live" in names
        ckpt.release_save_lock(lock)
    finally:
        live.kill()
        live.wait()


def test_lock_holder_is_recognised_by_save(tmp_path):
    lock = ckpt.acquire_save_lock(str(tmp_path))
    model, opt, state = build()
    save(tmp_path, 1, model, opt, state)
    saver = json.loads((tmp_path / "iter_0000001" / "saver.json").read_text())
    assert saver["token"] == lock.token and saver["pid"] == os.getpid()
    (tmp_path / "save.lock").unlink()  # someone removed our lock: the save refuses
    with pytest.raises(ckpt.CheckpointError, match="disappeared"):
        save(tmp_path, 2, model, opt, state)
    ckpt.release_save_lock(lock)


# ---- other starts and outputs --------------------------------------------------------------------------
def test_export_full_state_dict(trained):
    full = ckpt.export_full_state_dict(str(trained["root"]))
    # The logical vocabulary rows only (the padding rows are not part of the checkpoint).
    want = {k: (v[:61] if k in ("embedding.weight", "output_layer.weight") else v) for k, v in trained["saved"]["model"].items()}
    states_equal(full, want)


def test_hf_io_checkpoint_as_finetune_start(trained, tmp_path):
    from megatron.core.models.deepseek import hf_io
    from megatron.core.models.deepseek.model import DeepSeekModel

    config = tiny_config(make_vocab_size_divisible_by=1)
    src = DeepSeekModel(config)
    src.load_state_dict({k: (v[:61] if k in ("embedding.weight", "output_layer.weight") else v)
                         for k, v in trained["saved"]["model"].items()})
    hf_io.save_checkpoint(src, config, str(tmp_path))
    model, opt, state = build(seed=42, config=config)
    out = ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state)
    assert out["iteration"] == 0
    states_equal(snapshot(model), snapshot(src))
    assert ckpt.verify_checkpoint(str(tmp_path))["kind"].startswith("single-process")


def test_verify_module_cli_still_works(trained, capsys):
    assert ckpt.main(["verify", str(trained["root"])]) == 0
    assert "checkpoint OK" in capsys.readouterr().out
    assert ckpt.verify_saved_checkpoint(str(trained["root"]))["iteration"] == 2
    with pytest.raises(ckpt.CheckpointError, match="no such directory"):
        ckpt.verify_saved_checkpoint(str(trained["root"] / "absent"))


def test_save_is_timely(tmp_path):
    model, opt, state = build()
    start = time.perf_counter()
    save(tmp_path, 1, model, opt, state)
    assert time.perf_counter() - start < 30


def test_infinite_floats_in_run_metadata_round_trip(tmp_path):
    model, opt, state = build()
    ckpt.save_checkpoint(str(tmp_path), 1, [model], opt, {"max_lr": float("inf")}, None, state, None)
    out = ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state)
    assert out["scheduler_state"] == {"max_lr": float("inf")}
    assert ckpt.verify_checkpoint(str(tmp_path))["iteration"] == 1
