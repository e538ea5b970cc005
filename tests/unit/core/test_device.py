"""The device layer on CPU, and its HPU branches against stand-in habana modules that record calls."""

from types import SimpleNamespace

import pytest
import torch

from megatron.core.device import Device, detect_device_kind, device_of, get_device


class RecordingHabana:
    """Stand-in for habana_frameworks.torch.*: records every call made to it."""

    def __init__(self, available: bool = True) -> None:
        self.calls = []
        self.fused_sdpa = object()
        self.fused_rmsnorm = object()
        rec = self.calls.append
        self.modules = {
            "habana_frameworks.torch.hpu": SimpleNamespace(
                is_available=lambda: available,
                device_count=lambda: 8,
                set_device=lambda i: rec(("set_device", i)),
                synchronize=lambda: rec(("synchronize",)),
                memory_allocated=lambda: 123,
                max_memory_allocated=lambda: 456,
                reset_peak_memory_stats=lambda: rec(("reset_peak",)),
                manual_seed=lambda s: rec(("manual_seed", s)),
            ),
            "habana_frameworks.torch.hpu.random": SimpleNamespace(
                get_rng_state=lambda: torch.tensor([7]), set_rng_state=lambda s: rec(("set_rng", int(s[0])))
            ),
            "habana_frameworks.torch.core": SimpleNamespace(mark_step=lambda: rec(("mark_step",))),
            "habana_frameworks.torch.distributed.hccl": SimpleNamespace(),
            "habana_frameworks.torch.hpex.kernels": SimpleNamespace(FusedSDPA=self.fused_sdpa),
            "habana_frameworks.torch.hpex.normalization": SimpleNamespace(FusedRMSNorm=self.fused_rmsnorm),
        }

    def __call__(self, name):
        self.calls.append(("import", name))
        return self.modules.get(name)


def missing(_name):
    return None


def test_cpu_defaults():
    dev = get_device("cpu")
    assert dev.kind == "cpu"
    assert dev.dist_backend == "gloo"
    assert dev.torch_device(3) == torch.device("cpu")
    assert dev.memory_stats() == {}
    assert dev.fused_sdpa() is None and dev.fused_rmsnorm() is None
    dev.mark_step()  # no-op off HPU
    dev.synchronize()
    assert device_of(torch.zeros(2)).kind == "cpu"


def test_auto_without_habana_is_not_hpu():
    kind = detect_device_kind(missing)
    assert kind == ("cuda" if torch.cuda.is_available() else "cpu")
    assert get_device("auto", importer=missing).kind == kind


def test_auto_detects_hpu_when_habana_imports():
    fake = RecordingHabana()
    assert detect_device_kind(fake) == "hpu"
    assert detect_device_kind(RecordingHabana(available=False)) != "hpu"


def test_requesting_missing_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="habana_frameworks"):
        get_device("hpu", importer=missing)
    with pytest.raises(ValueError, match="device must be one of"):
        get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            get_device("cuda")


def test_hpu_branches_call_habana():
    fake = RecordingHabana()
    dev = get_device("hpu", lazy_mode=True, importer=fake)
    # One card per process (assigned from the local rank by HCCL), addressed as plain "hpu".
    assert dev.torch_device(2) == torch.device("hpu") and dev.torch_device(0) == torch.device("hpu")
    assert dev.dist_backend == "hccl"
    assert ("import", "habana_frameworks.torch.distributed.hccl") in fake.calls
    assert dev.device_count() == 8
    dev.set_device(2)
    dev.synchronize()
    dev.mark_step()
    dev.reset_peak_memory_stats()
    dev.manual_seed(5)
    dev.set_rng_state(dev.get_rng_state())
    assert dev.memory_stats() == {"allocated": 123, "max_allocated": 456}
    assert dev.fused_sdpa() is fake.fused_sdpa
    assert dev.fused_rmsnorm() is fake.fused_rmsnorm
    recorded = [c for c in fake.calls if c[0] != "import"]
    assert recorded == [  # no set_device: the card is not selected by index on Gaudi
        ("synchronize",),
        ("mark_step",),
        ("reset_peak",),
        ("manual_seed", 5),
        ("set_rng", 7),
    ]


def test_mark_step_only_in_lazy_mode():
    fake = RecordingHabana()
    eager = get_device("hpu", lazy_mode=False, importer=fake)
    eager.mark_step()
    assert ("mark_step",) not in fake.calls
    # lazy mode is dropped off HPU
    assert get_device("cpu", lazy_mode=True).lazy_mode is False


def test_optional_imports_are_memoised():
    fake = RecordingHabana()
    dev = get_device("hpu", importer=fake)
    dev.fused_sdpa()
    dev.fused_sdpa()
    assert fake.calls.count(("import", "habana_frameworks.torch.hpex.kernels")) == 1


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="unknown device kind"):
        Device(kind="xpu")


def test_device_names():
    assert get_device("cpu").device_name() == "cpu"
    fake = RecordingHabana()
    assert get_device("hpu", importer=fake).device_name() == "GAUDI"  # stand-in has no get_device_name
    fake.modules["habana_frameworks.torch.hpu"].get_device_name = lambda: "GAUDI3"
    assert get_device("hpu", importer=fake).device_name() == "GAUDI3"
