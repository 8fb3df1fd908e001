import json

import pytest

from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig
from dmquant.metrics.evaluation import evaluate

PROMPTS = [
    "a large red circle at the top left on a black background",
    "a large yellow circle in the center on a gray background",
    "a medium blue square at the bottom on a brown background",
    "a small white triangle at the right on a black background",
]
FAST = GenerationConfig(num_inference_steps=3, batch_size=4, progress=False)


def test_evaluate_writes_metrics_grid_and_report(tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    m = evaluate("tiny-shapes-sd", pf, 4, out, reference="tiny-shapes-sd", config=FAST, distributed=False)
    for key in ("clip_score", "fid", "psnr_vs_reference", "ssim_vs_reference", "num_images", "seconds"):
        assert key in m
    assert m["psnr_vs_reference"] == "inf" and m["ssim_vs_reference"] == pytest.approx(1.0)
    assert m["fid_vs_reference"] == pytest.approx(0.0, abs=1e-3) and m["num_images"] == 4
    assert 0 < m["clip_score"] <= 100 and m["fid"] > 0
    assert json.loads((out / "metrics.json").read_text()) == m
    assert (out / "grid.png").is_file() and "| PSNR" in (out / "report.md").read_text()
    assert len(list((out / "images" / "evaluated").glob("*.png"))) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_bad_inputs_raise_before_writing(tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(DMQuantError, match="neither a folder"):
        evaluate("tiny-shapes-sd", PROMPTS, 2, out, reference=str(tmp_path / "no-such-model"), config=FAST)
    with pytest.raises(DMQuantError, match="4 prompts but 8 images"):
        evaluate("tiny-shapes-sd", PROMPTS, 8, out, config=FAST)
    with pytest.raises(DMQuantError, match="at least 2"):
        evaluate("tiny-shapes-sd", PROMPTS, 1, out, config=FAST)
    with pytest.raises(DMQuantError, match="tiny-shapes-clip, tiny-shapes-dit, tiny-shapes-flux, tiny-shapes-sd"):
        evaluate("tiny-shapes-xxl", PROMPTS, 2, out, config=FAST)
    assert not out.exists() and list(tmp_path.iterdir()) == []
