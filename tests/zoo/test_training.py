"""The zoo's training loop helpers: the learning-rate schedule and the time budget."""

import torch

from dmquant.zoo import _training


class _Clock(_training.Logger):
    """A logger whose clock advances by a fixed amount per step (slower first steps; from step ``late`` on,
    ``late_step`` seconds a step), not by wall time."""

    def __init__(self, total: int, slow_steps: int, slow: float, fast: float, late: int = 10**9,
                 late_step: float = 0.0) -> None:
        super().__init__("test", total, every=10**9)
        self.now, self.slow_steps, self.slow, self.fast, self.done = 0.0, slow_steps, slow, fast, 0
        self.late, self.late_step = late, late_step

    def tick(self) -> None:
        if self.done >= self.late:
            self.now += self.late_step
        else:
            self.now += self.slow if self.done < self.slow_steps else self.fast
        self.done += 1

    @property
    def seconds(self) -> float:
        return self.now


def _run(budget, total=10_000, warmup=100, checks=10, **clock):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    log = _Clock(total, slow_steps=5, slow=2.0, fast=0.125, **clock)
    lrs = []
    for _step in _training.budgeted_steps(opt, total, 1.0, log, budget, warmup=warmup, checks=checks):
        lrs.append(opt.param_groups[0]["lr"])
        log.tick()
    return log, lrs


def test_budget_counts_the_steady_speed_not_the_slow_first_steps():
    log, lrs = _run(budget=110.0)
    # 5 slow steps (10 s) then 0.125 s a step: step 100 is reached at 21.875 s, 705 more steps fit the 88.125 s left
    # (a rate measured from step 0 would be 0.219 s a step: 402 more)
    assert log.total == len(lrs) == 805
    assert log.seconds == 110.0
    assert lrs[:100] == [_training.lr_at(s, 10_000, 1.0) for s in range(100)]  # the cut moved no warm-up rate
    assert lrs[-1] == _training.lr_at(804, 805, 1.0) and abs(lrs[-1] - 0.05) < 1e-3  # the cosine ends at 5%


def test_no_budget_keeps_the_step_count_and_a_short_budget_keeps_a_step_after_the_measurement():
    log, lrs = _run(budget=None, total=300)
    assert len(lrs) == 300 and log.total == 300
    log, lrs = _run(budget=5.0)
    assert len(lrs) == 101 and log.total == 101


def test_a_host_that_slows_down_later_still_holds_the_budget():
    # from step 300 on every step takes 0.25 s instead of 0.125: the count fixed at step 100 (805) would end at
    # 172.6 s; the later checks cut it so that the run ends within a few steps of the 110 s budget
    log, lrs = _run(budget=110.0, late=300, late_step=0.25)
    assert len(lrs) == log.total < 805
    assert 110.0 - 0.5 <= log.seconds <= 110.0 + 0.25
    assert all(b <= a + 1e-12 for a, b in zip(lrs[100:], lrs[101:]))  # the cosine only ever decreases
    log, lrs = _run(budget=110.0, late=300, late_step=0.25, checks=0)  # without the checks: overrun
    assert len(lrs) == 805 and log.seconds > 160.0
