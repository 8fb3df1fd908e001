import pytest

import dmquant
from dmquant.errors import DMQuantError
from dmquant.loading import load_pipeline


def test_load_pipeline_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "True")
    with pytest.raises(DMQuantError, match="HF_HUB_OFFLINE=1"):
        load_pipeline("dmquant-nonexistent/tiny-model")


def test_load_pipeline_from_a_folder_a_name_or_an_object(tmp_path):
    pipe = load_pipeline(str(dmquant.zoo.path("tiny-shapes-dit")))
    assert type(pipe).__name__ == "DiTPipeline" and len(pipe.labels) == 24
    assert load_pipeline(pipe) is pipe
    assert type(load_pipeline("tiny-random-dit")).__name__ == "DiTPipeline"
    with pytest.raises(DMQuantError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(DMQuantError, match="tiny-shapes-clip, tiny-shapes-dit, tiny-shapes-flux, tiny-shapes-sd, tiny-random"):
        load_pipeline("tiny-shapes-xxl")
