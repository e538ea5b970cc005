"""Two gloo ranks (DP2, distributed optimizer, DeepSeekModel built directly): the collective parts
of save and load. One process loads the DP2 checkpoint exactly; an error met by one rank only
(a corrupt block of the other rank's optimizer shard, read by that rank alone) reaches both ranks
as the same CheckpointError instead of leaving one waiting; the save lock and the tracker check
are decided once and raised on every rank."""

from __future__ import annotations

import json
import pytest
import torch

from megatron.core.distributed import DDPConfig, DistributedDataParallel
from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.optimizer import OptimizerConfig, build_optimizer, merge_optimizer_shards
from megatron.core.parallel_state import ParallelConfig, ParallelState
from megatron.training import checkpointing as ckpt
from tests.dist_utils import spawn
from tests.unit.training.checkpoint_testlib import build, snapshot, states_equal, tiny_config


def _dp2(seed: int):
    torch.manual_seed(seed)
    state = ParallelState.build(ParallelConfig())
    model = DeepSeekModel(tiny_config())
    ddp = DistributedDataParallel(model, DDPConfig(use_distributed_optimizer=True, bucket_size_mb=None), state)
    opt = build_optimizer([ddp], OptimizerConfig(lr=3e-3, use_distributed_optimizer=True), state)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for piece in opt.sharded_state()["pieces"]:  # distinct, known optimizer state
            for t in piece.tensors.values():
                t.copy_(torch.rand(t.shape, generator=g))
    return model, ddp, opt, state


def _save_then_fail(rank: int, world: int, root: str):
    model, ddp, opt, state = _dp2(seed=7)
    lock = ckpt.acquire_save_lock(root)  # collective: one lock file, the same token everywhere
    ckpt.save_checkpoint(root, 5, [ddp], opt, None, None, state, {"train": 40}, block_bytes=1024)
    outcome = {"lock": lock.token, "weights": snapshot(model), "optimizer": opt.state_dict()}
    try:
        ckpt.save_checkpoint(root, 4, [ddp], opt, None, None, state, None)
    except ckpt.CheckpointError as exc:
        outcome["rewind"] = str(exc)
    ckpt.release_save_lock(lock)
    return outcome


def _load(rank: int, world: int, root: str):
    _, ddp, opt, state = _dp2(seed=11)
    try:
        ckpt.load_checkpoint(root, [ddp], opt, None, state)
        return "loaded"
    except ckpt.CheckpointError as exc:
        return str(exc)


@pytest.mark.slow
def test_dp2_save_loads_in_one_process_and_errors_reach_every_rank(tmp_path):
    root = str(tmp_path / "ckpt")
    saved = spawn(2, _save_then_fail, root)
    assert saved[0]["lock"] == saved[1]["lock"]
    assert saved[0]["rewind"] == saved[1]["rewind"] and "would move it backwards" in saved[0]["rewind"]
    assert not (tmp_path / "ckpt" / "save.lock").exists()
    index = json.loads((tmp_path / "ckpt" / "iter_0000005" / "index.json").read_text())["index"]
    assert [f["name"] for f in index["files"]] == ["rank_00000.bin", "rank_00001.bin"]

    # One process (non-distributed optimizer) gets exactly the joined DP shards.
    model, opt, state = build(seed=3)
    assert ckpt.load_checkpoint(root, [model], opt, None, state)["iteration"] == 5
    states_equal(snapshot(model), saved[0]["weights"])
    joined = merge_optimizer_shards([saved[0]["optimizer"], saved[1]["optimizer"]])["params"][0]
    loaded = opt.state_dict()["params"][0]
    assert loaded.keys() == joined.keys()
    for name, entry in joined.items():
        rows = 61 if name in ("embedding.weight", "output_layer.weight") else None  # padding rows are not stored
        for key, value in entry.items():
            assert torch.equal(loaded[name][key][:rows], value[:rows]), (name, key)

    # Corrupt a block of rank 1's own optimizer shard: only rank 1 reads it.
    boxes = [(key, b) for key, t in index["tensors"].items() if key.startswith("optim/") for b in t["boxes"] if b[0] == 1]
    key, (_, offset, _, sizes) = max(boxes, key=lambda kb: kb[1][3][0] * (kb[1][3][1] if len(kb[1][3]) > 1 else 1))
    data = tmp_path / "ckpt" / "iter_0000005" / "rank_00001.bin"
    raw = bytearray(data.read_bytes())
    middle = offset + 4 * (sizes[0] * (sizes[1] if len(sizes) > 1 else 1)) // 2
    raw[middle] ^= 0x40
    data.write_bytes(bytes(raw))
    errors = spawn(2, _load, root)
    assert errors[0] == errors[1] and "rank_00001.bin: checksum mismatch" in errors[0] and "(iteration 5)" in errors[0]
