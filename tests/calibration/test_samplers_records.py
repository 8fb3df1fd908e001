import pytest
import torch

from dmquant.calibration.records import CalibrationSet, load_calls, save_calls
from dmquant.calibration.samplers import UniformSampler
from dmquant.errors import DMQuantError


@pytest.mark.parametrize("k, n, expected", [(5, 25, [0, 6, 12, 18, 24]), (3, 3, [0, 1, 2]),
                                            (10, 4, [0, 1, 2, 3]), (1, 50, [49]), (2, 10, [0, 9])])
def test_uniform_sampler(k, n, expected):
    assert UniformSampler(k).select(n) == expected


def test_records_round_trip_with_shared_tensors_and_nesting(tmp_path):
    shared = torch.randn(2, 3)
    calls = [((torch.randn(1, 4), torch.tensor(7)), {"enc": shared, "flag": False, "none": None,
                                                      "extra": {"a": torch.ones(2)}, "seq": [1, 2.5]}),
             ((torch.zeros(1, 4), torch.tensor(3)), {"enc": shared, "flag": True, "none": None,
                                                      "extra": {"a": torch.zeros(2)}, "seq": []})]
    save_calls(calls, tmp_path / "shard-00000.safetensors")
    loaded = list(CalibrationSet(tmp_path).iter_calls())
    assert len(loaded) == 2
    for (args, kw), (args2, kw2) in zip(calls, loaded):
        assert all(torch.equal(a, b) for a, b in zip(args, args2))
        assert torch.equal(kw["enc"], kw2["enc"]) and torch.equal(kw["extra"]["a"], kw2["extra"]["a"])
        assert (kw2["flag"], kw2["none"], kw2["seq"]) == (kw["flag"], None, kw["seq"])


def test_damaged_or_missing_shards_raise(tmp_path):
    with pytest.raises(DMQuantError, match="no calibration shards"):
        CalibrationSet(tmp_path)
    bad = tmp_path / "shard-00000.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(DMQuantError, match="missing or damaged"):
        load_calls(bad)
