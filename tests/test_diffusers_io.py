import pytest

import dmquant
from dmquant.diffusers_io import check_prompts, class_id, conditioning_argument, hub_offline, process_state
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_sd_pipeline


def test_prompts_map_to_dit_classes():
    dit = dmquant.zoo.load("tiny-shapes-dit")
    assert class_id(dit, "red circle") == dit.labels["red circle"]
    assert class_id(dit, "a large magenta diamond at the top on a gray background") == dit.labels["magenta diamond"]
    assert class_id(dit, 3) == 3 and class_id(dit, "7") == 7
    with pytest.raises(DMQuantError, match="labels"):
        class_id(dit, "a photo of a cat")
    with pytest.raises(DMQuantError, match="labels"):  # before any image is generated
        generate(dit, ["red circle", "a photo of a cat"], GenerationConfig(progress=False), distributed=False)


def test_conditioning_and_calibration_prompts():
    sd, dit = build_tiny_sd_pipeline(), build_tiny_dit_pipeline()
    assert conditioning_argument(sd) == "prompt" and conditioning_argument(dit) == "class_labels"
    assert check_prompts(dit, [1, 2]) == [1, 2] and check_prompts(sd, ("a", "b")) == ["a", "b"]
    for pipe, bad, message in ((dit, ["red"], "integer class ids"), (sd, [" "], "non-empty strings"),
                               (sd, [], "no calibration prompts")):
        with pytest.raises(DMQuantError, match=message):
            check_prompts(pipe, bad)
    with pytest.raises(DMQuantError, match="neither 'prompt' nor 'class_labels'"):
        conditioning_argument(lambda image: image)


@pytest.mark.parametrize("value, offline", [("1", True), ("TRUE", True), ("yes", True), ("On", True), ("0", False),
                                            ("false", False), ("", False)])
def test_hub_offline_values(value, offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_process_state_is_one_process_without_a_launcher():
    state = process_state("cpu")
    assert state.num_processes == 1 and state.is_main_process
