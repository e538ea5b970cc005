"""Distributed checkpoint (torch_dist): round trips, resume equality, resharding, crash safety,
load options, safe loading, hf_io start, verification and export."""

from __future__ import annotations

import datetime
import os
import pickle
import random
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.unit.parallel import layout_harness as H  # noqa: E402

from megatron.core.models.deepseek.model import DeepSeekModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, build_optimizer  # noqa: E402
from megatron.core.parallel_state import ParallelConfig, ParallelState  # noqa: E402
from megatron.core.transformer.moe.load_balancing import set_aux_loss_scale, update_expert_bias  # noqa: E402
from megatron.training import checkpointing as ckpt  # noqa: E402

CONFIG = H.tiny_config()


def build(seed: int = 1234):
    torch.manual_seed(seed)
    model = DeepSeekModel(CONFIG)
    state = ParallelState.build(ParallelConfig())
    opt = build_optimizer([model], OptimizerConfig(**H.OPTIMIZER), state)
    return model, opt, state


def train_steps(model, opt, steps) -> List[float]:
    """The harness reference loop for the given global steps (one process)."""
    losses = []
    for step in steps:
        opt.zero_grad()
        mbs = H.micro_batches(step, 0, 1)
        set_aux_loss_scale(model, 1.0 / len(mbs))
        total = 0.0
        for mb in mbs:
            loss = model.loss(model(mb["tokens"], labels=mb["labels"]), mb["loss_mask"]) / len(mbs)
            loss.backward()
            total += loss.item()
        ok, _, _ = opt.step()
        assert ok
        update_expert_bias(model)
        losses.append(total)
    return losses


def states_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def opt_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["param_groups"] == b["param_groups"]
    for ca, cb in zip(a["params"], b["params"]):
        assert ca.keys() == cb.keys()
        for name in ca:
            for key in ca[name]:
                assert torch.equal(ca[name][key], cb[name][key]), (name, key)


def save(root, it, model, opt, state, rng=True):
    return ckpt.save_checkpoint(str(root), it, [model], opt, {"lr_step": it}, None, state, {"train": it * 4}, rng=rng)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Checkpoint at iteration 2 plus the uninterrupted continuation (steps 2, 3)."""
    root = tmp_path_factory.mktemp("ckpt")
    model, opt, state = build()
    train_steps(model, opt, range(2))
    save(root, 2, model, opt, state)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    torch.manual_seed(77)
    random.seed(5)
    np.random.seed(6)
    expected_rng = (torch.rand(3), random.random(), np.random.rand())
    losses = train_steps(model, opt, range(2, 4))
    return {"root": root, "saved": saved, "losses": losses, "final": {k: v.clone() for k, v in model.state_dict().items()},
            "rng_after_save": expected_rng}


def test_roundtrip_and_bitwise_resume(trained):
    model, opt, state = build(seed=99)
    torch.manual_seed(3)
    out = ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state)
    assert out == {"iteration": 2, "consumed_samples": {"train": 8}, "scheduler_state": {"lr_step": 2}, "args": None}
    states_equal(model.state_dict(), trained["saved"]["model"])
    opt_equal(opt.state_dict(), trained["saved"]["opt"])
    assert train_steps(model, opt, range(2, 4)) == trained["losses"]
    states_equal(model.state_dict(), trained["final"])


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


def test_no_load_optim_and_finetune(trained):
    model, opt, state = build(seed=99)
    fresh = opt.state_dict()
    out = ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state, load_optim=False)
    assert out["iteration"] == 2 and out["scheduler_state"] is None
    states_equal(model.state_dict(), trained["saved"]["model"])
    opt_equal(opt.state_dict(), fresh)
    model, opt, state = build(seed=98)
    out = ckpt.load_checkpoint(str(trained["root"]), [model], opt, None, state, finetune=True)
    assert out["iteration"] == 0 and out["consumed_samples"] == {} and out["scheduler_state"] is None
    states_equal(model.state_dict(), trained["saved"]["model"])
    assert opt.state_dict()["step"] == 0


def test_no_checkpoint_returns_none(tmp_path):
    model, opt, state = build()
    assert ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state) is None
    assert ckpt.load_checkpoint(str(tmp_path / "absent"), [model], opt, None, state) is None


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    model, opt, state = build()
    save(tmp_path, 2, model, opt, state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
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
    states_equal(fresh.state_dict(), before)
    save(tmp_path, 4, model, opt, state)  # the next save cleans the stale temp dir
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())
    assert (tmp_path / ckpt.TRACKER_NAME).read_text() == "4"


def test_never_unpickles(trained, tmp_path, monkeypatch):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(trained["root"], d)
    it = Path(ckpt.iteration_dir(str(d), 2))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (it / "evil.pt").write_bytes(pickle.dumps(Evil()))
    real_load = torch.load

    def guarded(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    model, opt, state = build(seed=3)
    ckpt.load_checkpoint(str(d), [model], opt, None, state)
    (it / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
        ckpt.load_checkpoint(str(d), [model], opt, None, state)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata"):
        ckpt.verify_checkpoint(str(d))
    assert not marker.exists()


def test_verify_cli_and_corruption(trained, tmp_path, capsys):
    import shutil

    assert ckpt.main(["verify", str(trained["root"])]) == 0
    assert "checkpoint OK" in capsys.readouterr().out
    d = tmp_path / "c"
    shutil.copytree(trained["root"], d)
    it = Path(ckpt.iteration_dir(str(d), 2))
    data = next(it.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    assert ckpt.main(["verify", str(d)]) == 1
    assert data.name in capsys.readouterr().err
    model, opt, state = build()
    with pytest.raises(ckpt.CheckpointError, match=data.name):
        ckpt.load_checkpoint(str(d), [model], opt, None, state)
    (d / ckpt.TRACKER_NAME).write_text("7")
    with pytest.raises(ckpt.CheckpointError, match="iter_0000007"):
        ckpt.verify_checkpoint(str(d))
    os.remove(it / "common.json")
    with pytest.raises(ckpt.CheckpointError, match="common.json"):
        ckpt.verify_checkpoint(str(it))


def test_export_full_state_dict(trained):
    full = ckpt.export_full_state_dict(str(trained["root"]))
    states_equal(full, trained["saved"]["model"])


def test_hf_io_checkpoint_as_finetune_start(trained, tmp_path):
    from megatron.core.models.deepseek import hf_io

    src = DeepSeekModel(CONFIG)
    src.load_state_dict(trained["saved"]["model"])
    hf_io.save_checkpoint(src, CONFIG, str(tmp_path))
    model, opt, state = build(seed=42)
    out = ckpt.load_checkpoint(str(tmp_path), [model], opt, None, state)
    assert out["iteration"] == 0
    states_equal(model.state_dict(), trained["saved"]["model"])


# ---- resharding: one process -> two-rank layouts -> one process ------------------------------------
RESHARD_LAYOUTS = [
    H.Layout("tp2_sp_ep2_distopt", world=2, tp=2, ep=2, sp=True, dist_opt=True),
    H.Layout("pp2_uneven", world=2, pp=2, first_stage_layers=1),
]


def _worker(rank: int, port: int, root: str, layout: H.Layout, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=layout.world, timeout=datetime.timedelta(seconds=120))
    try:
        state = H.parallel_state_for(layout)
        torch.manual_seed(50 + rank)  # different init: everything must come from the checkpoint
        model, ddp, opt = H.build_parallel(layout, CONFIG, state)
        out = ckpt.load_checkpoint(os.path.join(root, "one"), [ddp], opt, None, state)
        assert out["iteration"] == 2
        loss, _ = H.parallel_step(2, layout, CONFIG, state, model, ddp, opt)
        ckpt.save_checkpoint(os.path.join(root, "two"), 3, [ddp], opt, out["scheduler_state"], None, state,
                             out["consumed_samples"])
        results[rank] = loss
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("layout", RESHARD_LAYOUTS, ids=lambda lay: lay.name)
def test_reshard_one_to_two_ranks_and_back(trained, tmp_path, layout):
    """A 1-process checkpoint loads into the layout, which trains one step with the straight run's
    loss and saves; that checkpoint loads back into one process and continues the straight run."""
    import shutil

    shutil.copytree(trained["root"], tmp_path / "one")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(H._free_port(), str(tmp_path), layout, results), nprocs=layout.world, join=True)
    losses = [v for v in results.values() if v is not None]  # last pipeline stage(s) report the loss
    assert losses
    for loss in losses:
        assert abs(loss - trained["losses"][0]) <= 1e-5 * abs(trained["losses"][0])
    assert ckpt.verify_checkpoint(str(tmp_path / "two"))["world_size"] == layout.world
    model, opt, state = build(seed=7)
    out = ckpt.load_checkpoint(str(tmp_path / "two"), [model], opt, None, state)
    assert out["iteration"] == 3 and out["consumed_samples"] == {"train": 8}
    (loss,) = train_steps(model, opt, [3])
    assert abs(loss - trained["losses"][1]) <= 1e-5 * abs(trained["losses"][1])
    for name, t in model.state_dict().items():
        assert H._relative(t, trained["final"][name]) < 1e-5, name
