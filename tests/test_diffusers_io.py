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


def test_a_true_cfg_pipeline_gets_its_guidance_as_true_cfg_scale_with_a_negative_prompt():
    from dmquant.diffusers_io import guidance_arguments, uses_true_cfg
    from dmquant.generation import GenerationConfig, generate
    from dmquant.models.tiny import build_tiny_pipeline

    qwen, flux = build_tiny_pipeline("tiny-random-qwen-image"), build_tiny_pipeline("tiny-random-flux")
    assert uses_true_cfg(qwen) and not uses_true_cfg(flux)  # FLUX.1-dev style: a guidance embedding
    assert guidance_arguments(qwen, {"guidance_scale": 4.0, "height": 32}, 3) == {
        "true_cfg_scale": 4.0, "negative_prompt": ["", "", ""], "height": 32}
    assert guidance_arguments(flux, {"guidance_scale": 4.0}, 3) == {"guidance_scale": 4.0}
    assert guidance_arguments(qwen, {"height": 32}, 3) == {"height": 32}
    calls = []
    qwen.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    for scale, per_step in ((None, 1), (4.0, 2)):  # true CFG: a conditional and an unconditional call per step
        calls.clear()
        generate(qwen, ["a red circle", "a blue square"], GenerationConfig(num_inference_steps=2, batch_size=2,
                 guidance_scale=scale, progress=False), height=32, width=32)
        assert len(calls) == 2 * per_step
