import numpy as np
import pytest
import torch

from dmquant.errors import DMQuantError
from dmquant.metrics.clip_score import clip_scores_per_image, compute_clip_score, load_clip
from dmquant.zoo import data


@pytest.fixture(scope="module")
def truth():
    caps = data.sample_captions(24, seed=41, split="train", two_object_prob=0.0)
    return np.stack([data.render(data.parse_caption(c), i) for i, c in enumerate(caps)]), caps


def test_clip_score_is_torchmetrics_formula(truth):
    images, caps = truth
    judge = load_clip("tiny-shapes-clip")
    cos = (judge.image_features(images) * judge.text_features(caps)).sum(-1)
    expected = float(torch.clamp(100 * cos, min=0).mean())
    assert compute_clip_score(images, caps) == pytest.approx(expected, rel=1e-4)


def test_per_image_scores_are_the_formula_per_image_and_average_to_the_score(truth):
    images, caps = truth
    judge = load_clip("tiny-shapes-clip")
    expected = torch.clamp(100 * (judge.image_features(images) * judge.text_features(caps)).sum(-1), min=0)
    per_image = clip_scores_per_image(images, caps)
    assert np.allclose(per_image, expected.numpy(), rtol=1e-4)
    assert np.mean(per_image) == pytest.approx(compute_clip_score(images, caps), rel=1e-4)
    with pytest.raises(DMQuantError, match="one prompt per image"):
        clip_scores_per_image(images, caps[:-1])


def test_matching_captions_score_higher_than_shuffled(truth):
    images, caps = truth
    shuffled = caps[1:] + caps[:1]
    assert compute_clip_score(images, caps) > compute_clip_score(images, shuffled) + 5


def test_clip_score_input_errors(truth):
    images, caps = truth
    with pytest.raises(DMQuantError, match="one prompt per image"):
        compute_clip_score(images, caps[:-1])


def test_unknown_or_unavailable_clip_models_raise():
    with pytest.raises(DMQuantError, match="cannot load the CLIP model"):
        load_clip("ViT-B-32:/nonexistent/weights.safetensors")
    with pytest.raises(DMQuantError, match="no such folder"):
        load_clip("local-dir:/nonexistent/folder")


def test_open_clip_loads_the_judge_by_itself():
    import open_clip

    from dmquant.zoo import path

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{path('tiny-shapes-clip')}")
    tok = open_clip.get_tokenizer(f"local-dir:{path('tiny-shapes-clip')}")
    assert tok(["a red circle"]).shape == (1, 32)
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
