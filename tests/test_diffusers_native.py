"""Loading dmquant models with plain diffusers (issue 16): ``DiffusionPipeline.from_pretrained(folder)`` and
``<Denoiser>.from_pretrained(folder, subfolder=...)`` through the ``dmquant`` quantizer registered with
diffusers, in a fresh process, bit for bit for every family; load-time quantization with
``PipelineQuantizationConfig``; one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.quantizers import PipelineQuantizationConfig
from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import dmquant
from dmquant import diffusers_hook, diffusers_quantizer, serialization
from dmquant.errors import DMQuantError
from dmquant.models.tiny import (
    _eval_mode,
    _tiny_clip,
    _tiny_t5,
    _tiny_vae,
    build_tiny_pipeline,
    char_t5_tokenizer,
    char_tokenizer,
)
from dmquant.nn.wrap import quant_layers


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A random-weight StableDiffusionXLPipeline (two CLIP encoders, a text_time UNet), 8×8×4 latents."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_tokenizer(), char_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, cross_attention_dim=32, block_out_channels=(32, 64), attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        norm_num_groups=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return _eval_mode(StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_clip(tokenizer, CLIPTextModel, 16), tokenizer=tokenizer,
        text_encoder_2=_tiny_clip(tokenizer_2, CLIPTextModelWithProjection, 16, projection_dim=16),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler))


def build_tiny_pixart_pipeline(seed: int = 0):
    """A random-weight PixArtAlphaPipeline (a T5 encoder, a 2-block PixArt transformer), 8×8×4 latents."""
    torch.manual_seed(seed)
    tokenizer = char_t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=32, caption_channels=32, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
    return _eval_mode(PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=_tiny_t5(tokenizer), vae=_tiny_vae(),
                                          transformer=transformer, scheduler=DDIMScheduler(clip_sample=False)))


SIDE16 = {"height": 16, "width": 16}
# family: (builder or tiny name, recipe, quantize kwargs, generation kwargs); DiT calibrates (static per-step
# ranges, quantized attention, a TimeTable), the others use calibration-free recipes (int4 groups, float8)
FAMILIES = {
    "sd": ("tiny-random-sd", "w8a8-fp8", {}, {"prompt": "a red circle", **SIDE16}),
    "sdxl": (build_tiny_sdxl_pipeline, "w4a16", {}, {"prompt": "a red circle", **SIDE16}),
    "pixart": (build_tiny_pixart_pipeline, "w8a8-fp8", {},
               {"prompt": "a red circle", "clean_caption": False, "use_resolution_binning": False,
                "max_sequence_length": 16, **SIDE16}),
    "dit": ("tiny-random-dit", "w8a8-time", {"prompts": [1, 2], "num_inference_steps": 2},
            {"class_labels": [3], "output_type": "np"}),
    "flux": ("tiny-random-flux", "w8a8-fp8", {}, {"prompt": "a red circle", **SIDE16}),
    "sd3": ("tiny-random-sd3", "w4a16", {}, {"prompt": "a red circle", **SIDE16}),
    "qwen-image": ("tiny-random-qwen-image", "w8a8-fp8", {}, {"prompt": "a red circle", "height": 32, "width": 32}),
    "wan": ("tiny-random-wan", "w4a16", {}, {"prompt": "a red circle", "num_frames": 5, **SIDE16}),
}


def run(pipe, kwargs: dict) -> torch.Tensor:
    kwargs = {"output_type": "latent", **kwargs}
    out = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)[0]
    return torch.as_tensor(out).float().contiguous()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family quantized, frozen, run once (the reference) and saved; ``calls.json`` and ``refs.safetensors``
    tell the fresh process what to run and what it must get."""
    root = tmp_path_factory.mktemp("native")
    calls, refs = {}, {}
    for family, (build, recipe, quant_kwargs, call) in FAMILIES.items():
        pipe = build_tiny_pipeline(build) if isinstance(build, str) else build()
        dmquant.quantize(pipe, recipe, progress=False, **quant_kwargs)
        dmquant.freeze(pipe)
        refs[family] = run(pipe, call)
        pipe.save_pretrained(root / family)
        attr = "unet" if hasattr(pipe, "unet") else "transformer"
        calls[family] = {"call": call, "attr": attr, "pipeline": type(pipe).__bases__[-1].__name__,
                         "denoiser": type(getattr(pipe, attr)).__name__,
                         "layers": len(quant_layers(getattr(pipe, attr))), "recipe": recipe}
    (root / "calls.json").write_text(json.dumps(calls))
    save_file(refs, str(root / "refs.safetensors"))
    return root


FRESH = """
import json, sys
import torch, diffusers
import dmquant
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from dmquant.nn.wrap import quant_layers

root = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))  # as the test process: the float reductions then run the same way
calls, refs, report = json.load(open(root + "/calls.json")), load_file(root + "/refs.safetensors"), {}
for family, c in calls.items():
    pipe = DiffusionPipeline.from_pretrained(f"{root}/{family}")
    kwargs = {"output_type": "latent", **c["call"]}
    out = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)[0]
    out = torch.as_tensor(out).float()
    denoiser = getattr(diffusers, c["denoiser"]).from_pretrained(f"{root}/{family}", subfolder=c["attr"])
    layers = [m for _, m in quant_layers(denoiser)]
    report[family] = {
        "pipeline": type(pipe).__name__, "equal": bool(torch.equal(out, refs[family])),
        "denoiser": type(denoiser).__name__, "layers": len(layers), "frozen": all(m.frozen for m in layers),
        "meta": any(t.is_meta for t in denoiser.state_dict().values()), "recipe": denoiser.dmquant.config.name,
        "quantized": bool(denoiser.is_quantized and getattr(pipe, c["attr"]).is_quantized),
        "same_as_pipeline": all(torch.equal(a, b) for a, b in zip(denoiser.state_dict().values(),
                                                                  getattr(pipe, c["attr"]).state_dict().values()))}
print("REPORT" + json.dumps(report))
"""


def test_diffusers_from_pretrained_reproduces_every_family_bit_for_bit_in_a_fresh_process(saved):
    done = subprocess.run([sys.executable, "-c", FRESH, str(saved), str(torch.get_num_threads())], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    calls = json.loads((saved / "calls.json").read_text())
    assert set(report) == set(FAMILIES)
    for family, got in report.items():
        want = calls[family]
        assert got == {"pipeline": want["pipeline"], "equal": True, "denoiser": want["denoiser"],
                       "layers": want["layers"], "frozen": True, "meta": False, "recipe": want["recipe"],
                       "quantized": True, "same_as_pipeline": True}, family
        assert want["layers"] > 5


def test_saved_folder_carries_the_quantization_config_and_shard_index(saved):
    folder = saved / "sd" / "unet"
    entry = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert entry == {"quant_method": "dmquant", "format_version": serialization.FORMAT_VERSION,
                     "dmquant_version": dmquant.__version__, "recipe": "w8a8-fp8", "description": "dmquant_config.json"}
    index = json.loads((folder / serialization.INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {serialization.WEIGHTS_NAME}
    assert serialization.QUANT_METHOD == diffusers_quantizer.QUANT_METHOD
    # dmquant's own loader reads the same folder
    assert type(dmquant.load_quantized_pipeline(saved / "sd")).__name__ == "QuantizedStableDiffusionPipeline"


def test_registration_is_lazy_and_idempotent():
    code = "import sys, dmquant; assert 'diffusers' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    # diffusers' quantizers loaded first: registered on import dmquant (the other order: the fresh process above)
    code = ("from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; import dmquant; "
            "assert M['dmquant'].__name__ == 'DMQuantizer'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    diffusers_hook.install()
    diffusers_quantizer.register()
    assert AUTO_QUANTIZER_MAPPING["dmquant"] is diffusers_quantizer.DMQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["dmquant"] is dmquant.DMQuantConfig
    assert not any(isinstance(f, diffusers_hook._Finder) for f in sys.meta_path)
    config = dmquant.DMQuantConfig("w4a16")
    assert config.recipe == "w4a16" and config.to_dict()["quant_method"] == "dmquant" and "w4a16" in repr(config)
    assert dmquant.DMQuantConfig(recipe=dmquant.load_recipe("w4a16")).recipe["name"] == "w4a16"  # kept as JSON


def test_torch_dtype_casts_float_tensors_and_keeps_the_codes(saved):
    native = DiTTransformer2DModel.from_pretrained(saved / "dit", subfolder="transformer", torch_dtype=torch.bfloat16)
    own = dmquant.load_quantized_denoiser(saved / "dit" / "transformer").to(torch.bfloat16)
    state, expected = native.state_dict(), own.state_dict()
    assert {t.dtype for t in state.values()} == {torch.bfloat16, torch.int8}
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in expected.items())


def _families_module():
    spec = importlib.util.spec_from_file_location("families", Path(__file__).parent / "models" / "families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["ltx", "cogvideox", "hunyuan-video"])
def test_transformer_only_families_load_with_their_class(family, tmp_path):
    """LTX-Video, CogVideoX, HunyuanVideo (no tiny pipelines): the denoiser class loads the saved transformer."""
    families = _families_module()
    model, inputs = families.build(family)
    recipe = dmquant.load_recipe("w8a8-fp8")
    dmquant.freeze(dmquant.quantize(model, recipe, progress=False))
    ((args, kwargs),) = families.calls(inputs, 0, timesteps=(500,))
    serialization.save_quantized_denoiser(model, tmp_path / "transformer", recipe)
    native = type(model).from_pretrained(tmp_path, subfolder="transformer")
    assert native.is_quantized and len(quant_layers(native)) == len(quant_layers(model)) > 5
    with torch.no_grad():
        assert torch.equal(native(*args, **kwargs)[0], model(*args, **kwargs)[0])


def test_a_folder_saved_before_the_entries_is_made_loadable_in_place(saved, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(saved / "sd", folder)
    sub = folder / "unet"
    config = json.loads((sub / "config.json").read_text())
    config.pop("quantization_config")
    (sub / "config.json").write_text(json.dumps(config))
    (sub / serialization.INDEX_NAME).unlink()  # now as dmquant wrote format 4 before issue 16
    assert dmquant.make_diffusers_loadable(folder) == sub
    assert sorted(p.name for p in sub.iterdir()) == sorted(p.name for p in (saved / "sd" / "unet").iterdir())
    native = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    own = dmquant.load_quantized_denoiser(sub)
    assert all(torch.equal(a, b) for a, b in zip(native.state_dict().values(), own.state_dict().values()))
    with pytest.raises(DMQuantError, match="holds no dmquant quantized denoiser"):
        dmquant.make_diffusers_loadable(tmp_path)


@pytest.fixture(scope="module")
def float_dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float") / "dit"
    build_tiny_pipeline("tiny-random-dit").save_pretrained(folder)
    return folder


def test_calibration_free_recipe_quantizes_while_loading(float_dit):
    config = PipelineQuantizationConfig(quant_mapping={"transformer": dmquant.DMQuantConfig(recipe="w4a16")})
    loaded = DiffusionPipeline.from_pretrained(float_dit, quantization_config=config)
    layers = [m for _, m in quant_layers(loaded.transformer)]
    assert layers and all(m.frozen and m.qweights[0].bits == 4 for m in layers)
    assert loaded.transformer.dmquant.config.name == "w4a16"
    reference = dmquant.freeze(dmquant.quantize(DiffusionPipeline.from_pretrained(float_dit), "w4a16", progress=False))
    call = {"class_labels": [3], "output_type": "np"}
    assert torch.equal(run(loaded, call), run(reference, call))  # as dmquant.quantize + freeze, bit for bit
    fp8 = DiTTransformer2DModel.from_pretrained(float_dit, subfolder="transformer",
                                                quantization_config=dmquant.DMQuantConfig("w8a8-fp8"))
    assert {q.qdata.dtype for _, m in quant_layers(fp8) for q in m.qweights} == {torch.float8_e4m3fn}


def test_static_activation_recipe_at_load_time_fails_with_one_line(float_dit):
    with pytest.raises(DMQuantError) as err:
        DiTTransformer2DModel.from_pretrained(float_dit, subfolder="transformer",
                                              quantization_config=dmquant.DMQuantConfig(recipe="w8a8-static"))
    message = str(err.value)
    assert "\n" not in message and "needs calibration data" in message and "w4a16" in message


@pytest.mark.parametrize("damage, expected", [
    ("newer", "newer dmquant"), ("no-description", "dmquant_config.json is missing"),
    ("description-newer", "upgrade dmquant"), ("missing-tensor", "does not match")])
def test_damaged_or_newer_folders_fail_with_one_line(saved, tmp_path, damage, expected):
    folder = tmp_path / "dit"
    shutil.copytree(saved / "dit", folder)
    sub = folder / "transformer"
    if damage == "newer":
        config = json.loads((sub / "config.json").read_text())
        config["quantization_config"]["format_version"] = 99
        (sub / "config.json").write_text(json.dumps(config))
    elif damage == "no-description":
        (sub / serialization.CONFIG_NAME).unlink()
    elif damage == "description-newer":
        description = json.loads((sub / serialization.CONFIG_NAME).read_text())
        (sub / serialization.CONFIG_NAME).write_text(json.dumps({**description, "version": 99}))
    elif damage == "missing-tensor":
        index = json.loads((sub / serialization.INDEX_NAME).read_text())
        index["weight_map"].pop(sorted(index["weight_map"])[0])
        (sub / serialization.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(DMQuantError) as err:
        DiffusionPipeline.from_pretrained(folder)
    assert "\n" not in str(err.value) and expected in str(err.value)
