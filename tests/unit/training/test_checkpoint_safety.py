"""Loading cannot execute code, and damaged checkpoints fail loudly naming the file and iteration.

Crafted payloads: an earlier-format DCP directory whose pickled `.metadata` carries the
BytesStorageMetadata trick (extra `properties` / `size` attached at unpickling so that torch's
planner would read the entry with torch.load(weights_only=False)) and whose data file is a
pickle that touches a marker file; hostile index.json contents. Every reader (load, verify,
export, the tools) must refuse them with our CheckpointError, touch nothing, and never call
pickle or torch.load. Damage: flipped bytes, truncation, a damaged index header, edited
common.json / RNG files, a corrupt tracker.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.training import checkpointing as ckpt
from megatron.training.checkpoint_format import sha256_text
from tests.unit.training.checkpoint_testlib import build, save, train_steps

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    model, opt, state = build()
    train_steps(model, opt, range(1))
    save(root, 2, model, opt, state)
    return root


@pytest.fixture
def copy(good, tmp_path):
    shutil.copytree(good, tmp_path / "c")
    return tmp_path / "c", tmp_path / "c" / "iter_0000002"


class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything calls pickle or torch.load while it runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("pickle / torch.load called while reading a checkpoint")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)


def _old_format_dir(root: Path, marker: Path) -> Path:
    """An earlier-format (DCP) checkpoint whose metadata and data are hostile pickles."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, TensorProperties

    it = root / "iter_0000002"
    it.mkdir(parents=True)
    entry = BytesStorageMetadata()
    entry.properties = TensorProperties(dtype=torch.float32)  # set by pickle's BUILD step on load
    entry.size = torch.Size([64, 32])
    payload = pickle.dumps(_Touch(marker))
    (it / "__0_0.distcp").write_bytes(payload)
    md = Metadata(state_dict_metadata={"model/embedding.weight": entry},
                  storage_data={MetadataIndex("model/embedding.weight"): _StorageInfo("__0_0.distcp", 0, len(payload))})
    (it / ".metadata").write_bytes(pickle.dumps(md))
    (it / "common.json").write_text(json.dumps({"format": "megatron-deepseek-torch_dist/1", "iteration": 2,
                                                "args": None, "optimizer": None}))
    (root / ckpt.TRACKER_NAME).write_text("2")
    return it


def test_old_format_with_the_bytes_metadata_trick_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    root = tmp_path / "old"
    _old_format_dir(root, marker)
    assert b"BytesStorageMetadata" in (root / "iter_0000002" / ".metadata").read_bytes()
    from megatron.training import checkpoint_export, checkpoint_verify
    from tools import convert_hf_checkpoint

    model, opt, state = build()
    with pytest.MonkeyPatch.context() as mp:
        for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            mp.setattr(mod, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickling")))
        for call in (
            lambda: ckpt.load_checkpoint(str(root), [model], opt, None, state),
            lambda: ckpt.verify_checkpoint(str(root)),
            lambda: checkpoint_export.export_full_state_dict(str(root)),
            lambda: checkpoint_export.load_full_model(str(root)),
        ):
            with pytest.raises(ckpt.CheckpointError, match=r"iter_0000002/(\.metadata|common\.json): checkpoint in the earlier"):
                call()
        assert checkpoint_verify.main([str(root)]) == 1
        assert convert_hf_checkpoint.main(["export", "--checkpoint", str(root), "--hf-path", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "checkpoint INVALID" in err and "earlier torch.distributed.checkpoint format" in err
    # Claiming the new format does not help: there is no index, and .metadata is never opened.
    common = root / "iter_0000002" / "common.json"
    common.write_text(json.dumps({"format": "megatron-deepseek-torch_dist/2", "iteration": 2}))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: checkpoint in the earlier"):
        ckpt.load_checkpoint(str(root), [model], opt, None, state)
    assert not marker.exists()


def _rewrite_index(it: Path, edit) -> None:
    """Apply `edit` to the index body and store it with a VALID self-checksum (a deliberate forgery)."""
    path = it / "index.json"
    body = json.loads(path.read_text())["index"]
    edit(body)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    path.write_text(json.dumps({"sha256": sha256_text(canonical), "index": body}))


HOSTILE_INDEX = {
    "dtype_object": (lambda b: b["tensors"]["model/embedding.weight"].update(dtype="object"), "dtype 'object' not allowed"),
    "path_escape": (lambda b: b["files"][0].update(name="../../outside.bin"), "bad file name"),
    "box_past_file": (lambda b: b["tensors"]["model/embedding.weight"]["boxes"][0].__setitem__(1, 10**12), "past the end"),
    "box_outside_shape": (lambda b: b["tensors"]["model/embedding.weight"]["boxes"][0].__setitem__(2, [60, 0]), "outside the shape"),
    "float_offset": (lambda b: b["tensors"]["model/embedding.weight"]["boxes"][0].__setitem__(1, 1.5), "not allowed|integer"),
    "unknown_field": (lambda b: b.update(loader="pickle"), "unknown"),
    "aux_escape": (lambda b: b["aux_files"].update({"../x": "0" * 64}), "bad path"),
    "bool_as_int": (lambda b: b["tensors"]["model/embedding.weight"]["boxes"][0].__setitem__(0, True), "integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_INDEX))
def test_hostile_index_is_refused_naming_the_file(copy, case, no_unpickling):
    root, it = copy
    edit, message = HOSTILE_INDEX[case]
    _rewrite_index(it, edit)
    model, opt, state = build()
    with pytest.raises(ckpt.CheckpointError, match=rf"iter_0000002/index\.json: corrupt or not a checkpoint index: .*({message})"):
        ckpt.load_checkpoint(str(root), [model], opt, None, state)
    with pytest.raises(ckpt.CheckpointError, match=r"index\.json"):
        ckpt.verify_checkpoint(str(root))


def test_index_json_syntax_tricks(copy, no_unpickling):
    root, it = copy
    path = it / "index.json"
    text = path.read_text()
    for bad, why in ((text.replace('"index":', '"index": NaN, "index":', 1), "NaN|duplicate"),
                     (text.replace('{"sha256"', '{"sha256": "x", "sha256"', 1), "duplicate"),
                     ("\x00\x01garbage" + text[10:], "corrupt"),
                     (text.replace('"iteration":2', '"iteration":3'), "checksum mismatch")):
        path.write_text(bad)
        with pytest.raises(ckpt.CheckpointError, match=rf"index\.json: .*({why})"):
            ckpt.verify_checkpoint(str(root))


def test_flipped_bytes_fail_load_verify_and_the_tool(copy, no_unpickling):
    root, it = copy
    data = it / "rank_00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) - 100] ^= 0x01  # one bit, in the optimizer state near the end
    data.write_bytes(bytes(raw))
    model, opt, state = build()
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00000\.bin: checksum mismatch in bytes \[\d+, \d+\) \(iteration 2\)"):
        ckpt.load_checkpoint(str(root), [model], opt, None, state)
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00000\.bin: checksum mismatch .*iteration 2"):
        ckpt.verify_checkpoint(str(root))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "verify_checkpoint.py"), str(root)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 1 and "rank_00000.bin: checksum mismatch" in proc.stderr and "OK" not in proc.stdout


def test_truncated_data_and_damaged_small_files(copy, no_unpickling):
    root, it = copy
    model, opt, state = build()
    common = it / "common.json"
    original = common.read_text()
    common.write_text(original.replace('"iteration": 2', '"iteration": 2 ').replace('"train": 8', '"train": 9'))
    with pytest.raises(ckpt.CheckpointError, match=r"common\.json: checksum mismatch \(iteration 2\)"):
        ckpt.load_checkpoint(str(root), [model], opt, None, state)
    common.write_text(original)
    rng = it / "rng" / "rank_00000.json"
    rng.write_text(rng.read_text().replace("[", "[ ", 1))
    with pytest.raises(ckpt.CheckpointError, match=r"rng/rank_00000\.json: checksum mismatch"):
        ckpt.load_checkpoint(str(root), [model], opt, None, state)
    assert ckpt.load_checkpoint(str(root), [model], opt, None, state, load_rng=False)["iteration"] == 2
    with pytest.raises(ckpt.CheckpointError, match=r"rng/rank_00000\.json: checksum mismatch"):
        ckpt.verify_checkpoint(str(root))
    data = it / "rank_00000.bin"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00000\.bin: 1000 bytes, the index records \d+ \(iteration 2\)"):
        ckpt.load_checkpoint(str(root), [model], opt, None, state, load_rng=False)
    (root / ckpt.TRACKER_NAME).write_text("two")
    with pytest.raises(ckpt.CheckpointError, match="latest_checkpointed_iteration.txt: expected an iteration number"):
        ckpt.load_checkpoint(str(root), [model], opt, None, state)
    os.remove(it / "index.json")
    with pytest.raises(ckpt.CheckpointError, match=r"index\.json: missing"):
        ckpt.verify_checkpoint(str(it))
