"""``dmquant demo`` end to end at a smoke size (the README's main command; full size in eval/RESULTS.md)."""

import math

from dmquant.demo import DemoConfig, format_table, run_demo


def test_demo_evaluates_fp_and_each_recipe(tmp_path):
    # w4a4-svd: the W4A4 without learned rounding (w4a4's fit takes minutes on the zoo model; the demo runs any recipe)
    config = DemoConfig(recipes=("w8a8", "w4a4-svd"), num_images=4, num_calib_prompts=2, num_inference_steps=4,
                        out=str(tmp_path / "demo"), progress=False)
    rows = run_demo(config)
    assert [r["model"] for r in rows] == ["fp32", "w8a8", "w4a4-svd"]
    assert rows[0]["psnr_vs_reference"] is None and rows[0]["calibration_seconds"] == 0.0
    w8, w4 = rows[1]["psnr_vs_reference"], rows[2]["psnr_vs_reference"]
    assert w8 > w4 > 20.0, (w8, w4)  # fewer bits, lower fidelity, both close to FP
    assert all(0.0 <= r["judge_color_accuracy"] <= 1.0 and math.isfinite(r["clip_score"]) for r in rows)
    table = format_table(rows)
    assert table.count("\n") == 4 and "| w4a4-svd |" in table
    assert (tmp_path / "demo" / "w4a4-svd" / "model" / "unet" / "dmquant_config.json").is_file()
