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
