"""The zoo's training loop helpers: the learning-rate schedule and the time budget."""

import argparse
import json

import pytest
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


def _run(budget, total=10_000, warmup=100, checks=10, cuts=None, **clock):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    log = _Clock(total, slow_steps=5, slow=2.0, fast=0.125, **clock)
    lrs = []
    for _step in _training.budgeted_steps(opt, total, 1.0, log, budget, warmup=warmup, checks=checks, cuts=cuts):
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


def test_a_budgeted_run_records_its_cuts_and_replaying_them_repeats_its_learning_rates():
    log, lrs = _run(budget=110.0, late=300, late_step=0.25)  # cut at step 100, then again as the host slows
    assert len(log.cuts) >= 2 and log.cuts[0] == (100, 805) and log.cuts[-1][1] == len(lrs)
    replay, replay_lrs = _run(budget=None, cuts=log.cuts)  # another host speed: the cuts, not the clock, decide
    assert replay_lrs == lrs and replay.cuts == log.cuts
    # a run with one cut at the measurement step: --steps N alone repeats it (no warm-up rate moved)
    log, lrs = _run(budget=110.0)
    assert log.cuts == [(100, 805)] and _run(budget=None, total=805)[1] == lrs
    with pytest.raises(ValueError, match="not both"):
        _run(budget=110.0, cuts=[(100, 805)])


def test_schedule_cuts_are_read_from_text_or_a_train_log(tmp_path):
    assert _training.schedule_cuts("100:805,400:700") == [(100, 805), (400, 700)]
    (tmp_path / "train_log.json").write_text(json.dumps({"schedule_cuts": [[100, 9144], [1000, 9000]]}))
    assert _training.schedule_cuts(str(tmp_path / "train_log.json")) == [(100, 9144), (1000, 9000)]
    assert _training.schedule_cuts(str(tmp_path)) == [(100, 9144), (1000, 9000)]  # the model folder
    for bad in ("100", "100:50", "400:900,100:800", "a:b", str(tmp_path / "missing.json")):
        with pytest.raises(argparse.ArgumentTypeError):
            _training.schedule_cuts(bad)
    parser = argparse.ArgumentParser()
    _training.add_budget_arguments(parser)
    assert parser.parse_args(["--schedule-cuts", "100:805"]).schedule_cuts == [(100, 805)]
    with pytest.raises(SystemExit) as exit_:  # a budget and cuts to replay: one line, exit 2
        parser.parse_args(["--time-budget", "60", "--schedule-cuts", "100:805"])
    assert exit_.value.code == 2
