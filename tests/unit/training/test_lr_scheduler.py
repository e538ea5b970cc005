"""OptimizerParamScheduler against hand-computed Megatron values."""

import math

import pytest

from megatron.training.lr_scheduler import OptimizerParamScheduler


class _Opt:
    lr = None

    def set_lr(self, lr):
        self.lr = lr


def sched(style="linear", warmup=10, decay=110, max_lr=1.0, min_lr=0.1, **kw):
    return OptimizerParamScheduler(_Opt(), max_lr, min_lr, warmup, decay, style, **kw)


def test_warmup_from_zero_and_initial_lr_set():
    s = sched()
    assert s.optimizer.lr == 0.0  # first iteration runs at lr(0), as in Megatron
    assert s.get_lr(5) == pytest.approx(0.5)
    assert s.get_lr(10) == pytest.approx(1.0)
    assert sched(init_lr=0.2).get_lr(5) == pytest.approx(0.6)


def test_linear_and_cosine():
    lin, cos = sched("linear"), sched("cosine")
    assert lin.get_lr(60) == pytest.approx(0.1 + 0.5 * 0.9)  # ratio 0.5
    assert lin.get_lr(110) == pytest.approx(0.1)
    assert lin.get_lr(500) == pytest.approx(0.1)
    assert cos.get_lr(60) == pytest.approx(0.1 + 0.5 * (math.cos(math.pi * 0.5) + 1) * 0.9)
    assert cos.get_lr(35) == pytest.approx(0.1 + 0.5 * (math.cos(math.pi * 0.25) + 1) * 0.9)


def test_constant_and_inverse_sqrt():
    assert sched("constant").get_lr(1000) == pytest.approx(1.0)
    inv = sched("inverse-square-root", warmup=4, decay=100, min_lr=0.0)
    assert inv.get_lr(16) == pytest.approx(0.5)  # sqrt(4)/sqrt(16)
    assert inv.get_lr(4) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "wsd_style, expected",
    [("linear", 0.1 + 0.5 * 0.9), ("cosine", 0.1 + 0.5 * 0.9),
     ("exponential", 0.1 + (2 * 0.5**0.5 - 1) * 0.9), ("minus_sqrt", 0.1 + (1 - 0.5**0.5) * 0.9)],
)
def test_wsd(wsd_style, expected):
    s = sched("WSD", wsd_decay_steps=20, lr_wsd_decay_style=wsd_style)
    assert s.get_lr(50) == pytest.approx(1.0)  # stable until 110 - 20
    assert s.get_lr(90) == pytest.approx(1.0)
    assert s.get_lr(100) == pytest.approx(expected)  # halfway through the decay
    assert s.get_lr(110) == pytest.approx(0.1)


def test_step_and_state_dict_round_trip():
    s = sched()
    for _ in range(7):
        s.step()
    assert s.optimizer.lr == pytest.approx(0.7)
    t = sched()
    t.load_state_dict(s.state_dict())
    assert t.num_steps == 7 and t.optimizer.lr == pytest.approx(0.7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr-decay-style"):
        sched("square")
    with pytest.raises(ValueError, match="lr-warmup-iters"):
        sched(warmup=200)
    with pytest.raises(ValueError, match="WSD"):
        sched("WSD")
    with pytest.raises(ValueError, match="min-lr"):
        sched(min_lr=2.0)
