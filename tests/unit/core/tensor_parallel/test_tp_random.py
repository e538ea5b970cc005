"""RNG tracker: fork isolation, per-rank streams, state round trip, misuse errors."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.device import Device
from megatron.core.tensor_parallel import (
    EXPERT_PARALLEL_RNG,
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    model_parallel_rng_tracker,
)


def draws(seed, *sizes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=gen) for n in sizes]


def test_fork_draws_from_the_named_stream_and_leaves_the_default_stream_untouched():
    tracker = model_parallel_rng_tracker(seed=7, tp_rank=1)
    d1 = torch.rand(3)
    with tracker.fork(MODEL_PARALLEL_RNG):
        m1 = torch.rand(5)
    d2 = torch.rand(3)
    with tracker.fork():  # the default name is the model-parallel stream
        m2 = torch.rand(2)
    d3 = torch.rand(3)
    # The default stream continues as if the forks never happened ...
    expected_default = draws(7, 3, 3, 3)
    for got, want in zip((d1, d2, d3), expected_default):
        assert torch.equal(got, want)
    # ... and the model-parallel stream continues across forks, seeded with seed + 2718 + tp_rank.
    expected_mp = draws(7 + 2718 + 1, 5, 2)
    assert torch.equal(m1, expected_mp[0]) and torch.equal(m2, expected_mp[1])


def test_tp_ranks_get_different_model_parallel_streams_and_the_same_default():
    t0 = model_parallel_rng_tracker(seed=3, tp_rank=0)
    default0 = torch.rand(4)
    with t0.fork():
        mp0 = torch.rand(4)
    t1 = model_parallel_rng_tracker(seed=3, tp_rank=1)
    default1 = torch.rand(4)
    with t1.fork():
        mp1 = torch.rand(4)
    assert torch.equal(default0, default1)
    assert not torch.equal(mp0, mp1)


def test_dropout_inside_fork_is_reproducible_from_the_stream():
    tracker = model_parallel_rng_tracker(seed=11, tp_rank=0)
    x = torch.ones(64)
    with tracker.fork():
        a = F.dropout(x, p=0.5, training=True)
    replay = model_parallel_rng_tracker(seed=11, tp_rank=0)
    torch.manual_seed(999)  # a different default stream must not matter
    with replay.fork():
        b = F.dropout(x, p=0.5, training=True)
    assert torch.equal(a, b)
    assert (a == 0).any() and (a != 0).any()


def test_state_round_trip_replays_the_stream():
    tracker = model_parallel_rng_tracker(seed=5, tp_rank=0, ep_rank=2, etp_rank=1)
    assert tracker.names == sorted([MODEL_PARALLEL_RNG, EXPERT_PARALLEL_RNG])
    saved = tracker.get_states()
    with tracker.fork(EXPERT_PARALLEL_RNG):
        first = torch.rand(6)
    assert torch.equal(first, draws(5 + 1024 + 100 * 2 + 1, 6)[0])
    with tracker.fork(EXPERT_PARALLEL_RNG):
        assert not torch.equal(torch.rand(6), first)  # the stream moved on
    tracker.set_states(saved)
    with tracker.fork(EXPERT_PARALLEL_RNG):
        assert torch.equal(torch.rand(6), first)  # ... and is rewound by set_states

    # get_states returns copies: changing them does not touch the tracker.
    live = tracker.get_states()
    copy = tracker.get_states()
    copy[MODEL_PARALLEL_RNG].zero_()
    assert torch.equal(tracker.get_states()[MODEL_PARALLEL_RNG], live[MODEL_PARALLEL_RNG])

    # A fresh tracker restored from a checkpointed state continues the same stream.
    restored = RNGStatesTracker()
    restored.set_states({MODEL_PARALLEL_RNG: live[MODEL_PARALLEL_RNG]})
    with restored.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    assert torch.equal(a, b)


def test_fork_restores_the_default_stream_after_an_exception():
    tracker = model_parallel_rng_tracker(seed=1, tp_rank=0)
    before = torch.get_rng_state()
    with pytest.raises(KeyError):
        with tracker.fork():
            torch.rand(10)
            raise KeyError("boom")
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():  # usable again after the exception
        torch.rand(1)


def test_misuse_raises():
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1 .* already used by 'a'"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="unknown RNG stream 'zzz'"):
        with tracker.fork("zzz"):
            pass
    with tracker.fork("a"):
        with pytest.raises(RuntimeError, match="already forked"):
            with tracker.fork("a"):
                pass
        with pytest.raises(RuntimeError, match="while"):
            tracker.set_states({})
    with pytest.raises(ValueError, match="uint8"):
        tracker.set_states({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="tp_rank"):
        model_parallel_rng_tracker(seed=1, tp_rank=-1)


class _FakeAccelerator(Device):
    """A device layer whose 'device generator' is a private CPU generator, to exercise the non-CPU path."""

    def __init__(self):
        super().__init__(kind="cuda")
        self.gen = torch.Generator()

    def manual_seed(self, seed):
        torch.manual_seed(seed)
        self.gen.manual_seed(seed)

    def get_rng_state(self):
        return self.gen.get_state()

    def set_rng_state(self, state):
        self.gen.set_state(state)


def test_accelerator_streams_go_through_the_device_layer():
    device = _FakeAccelerator()
    tracker = model_parallel_rng_tracker(seed=21, tp_rank=1, device=device)
    cpu_before = torch.get_rng_state()
    default_first = torch.rand(3, generator=device.gen)
    with tracker.fork():
        forked = torch.rand(3, generator=device.gen)
    default_second = torch.rand(3, generator=device.gen)
    assert torch.equal(forked, draws(21 + 2718 + 1, 3)[0])
    assert [torch.equal(a, b) for a, b in zip((default_first, default_second), draws(21, 3, 3))] == [True, True]
    assert torch.equal(torch.get_rng_state(), cpu_before), "seeding a device stream must not disturb the CPU RNG"
