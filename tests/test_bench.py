import json

import torch

from dmquant.bench import bench_model, denoiser_inputs, peak_rss_while_loading
from dmquant.cli import main
from dmquant.models.tiny import build_tiny_dit_pipeline, build_tiny_sd_pipeline


def test_denoiser_inputs_match_each_architecture():
    unet = build_tiny_sd_pipeline().unet
    (x, t), kw = denoiser_inputs(unet, batch=2, latent_size=8)
    assert x.shape == (2, 4, 8, 8) and kw["encoder_hidden_states"].shape == (2, 77, 32)
    with torch.no_grad():
        assert unet(x, t, **kw).sample.shape == x.shape
    dit = build_tiny_dit_pipeline().transformer
    args, kw = denoiser_inputs(dit, batch=3)
    with torch.no_grad():
        assert dit(*args, **kw).sample.shape == (3, 8, 8, 8)


def test_denoiser_inputs_of_sdxl_and_flux_and_regional_compilation():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from dmquant.bench import compile_regions, uncompile

    torch.manual_seed(0)
    sdxl = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, cross_attention_dim=32, block_out_channels=(32, 64), attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 48,
        norm_num_groups=16).eval()
    (x, t), kw = denoiser_inputs(sdxl, batch=2, latent_size=8, text_tokens=5)
    assert kw["added_cond_kwargs"]["text_embeds"].shape == (2, 16) and kw["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    with torch.no_grad():
        assert sdxl(x, t, **kw).sample.shape == (2, 4, 8, 8)
    flux = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=8,
                                  guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    (tokens,), kw = denoiser_inputs(flux, batch=1, latent_size=8, text_tokens=6)
    assert tokens.shape == (1, 16, 16) and kw["img_ids"].shape == (16, 3) and kw["txt_ids"].shape == (6, 3)
    assert kw["img_ids"][5].tolist() == [0.0, 1.0, 1.0]  # row 1, column 1 of the 4x4 token grid
    with torch.no_grad():
        expected = flux(tokens, **kw).sample
    blocks = compile_regions(flux)
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    uncompile(blocks)
    assert all(b._compiled_call_impl is None for b in blocks)
    with torch.no_grad():
        assert torch.equal(flux(tokens, **kw).sample, expected)


def test_bench_reports_latency_and_memory_of_a_saved_folder(tmp_path, capsys):
    import dmquant

    pipe = build_tiny_dit_pipeline()
    dmquant.quantize(pipe, "w4a16")
    pipe.save_pretrained(tmp_path / "q")
    assert main(["bench", "--model", str(tmp_path / "q"), "--json", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seconds_per_step"] > 0 and report["latent_size"] == 8 and report["batch"] == 2
    fp = bench_model("tiny-random-dit", measure_load=False, repeats=1)
    # 4-bit weights in memory (the label-embedding table, kept in FP, is most of this tiny model)
    assert report["denoiser_bytes"] < 0.8 * fp["denoiser_bytes"]
    assert report["folder_bytes"] > 0 and report["peak_rss_load_bytes"] > 0


def test_peak_rss_of_a_load_counts_the_loaded_tensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "blob.safetensors"
    save_file({"x": torch.ones(64 << 20, dtype=torch.uint8)}, str(path))  # 64 MiB
    report = peak_rss_while_loading(str(path), "safetensors.torch:load_file")
    assert 60 << 20 < report["peak_rss_resident_bytes"] < 200 << 20
