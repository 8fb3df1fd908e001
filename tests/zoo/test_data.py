import numpy as np
import pytest

from dmquant.errors import DMQuantError
from dmquant.zoo import data


def test_generator_is_deterministic_to_the_pixel():
    a_img, a_cap = data.make_dataset(24, seed=3)
    b_img, b_cap = data.make_dataset(24, seed=3)
    c_img, _ = data.make_dataset(24, seed=4)
    assert a_img.dtype == np.uint8 and a_img.shape == (24, 32, 32, 3)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)


def test_canonical_render_pixels():
    scene = data.parse_caption("a large red circle in the center on a black background")
    img = data.render(scene)
    assert tuple(img[16, 16]) == data.COLORS["red"]
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[31, 31]) == (0, 0, 0)
    small = data.render(data.parse_caption("a small red circle in the center on a black background"))
    assert (small != 0).any(axis=-1).sum() < (img != 0).any(axis=-1).sum()


def test_caption_grammar_round_trip():
    _, caps = data.make_dataset(300, seed=5, two_object_prob=0.5)
    assert any(" and " in c for c in caps)
    for c in caps:
        assert data.parse_caption(c).caption == c
    scene = data.parse_caption("a small blue square at the top and a large white triangle in the center on a gray background")
    assert [(o.size, o.color, o.shape, o.position) for o in scene.objects] == [
        ("small", "blue", "square", "top"), ("large", "white", "triangle", "center")]
    assert scene.background == "gray"


@pytest.mark.parametrize("bad", ["a red circle", "a large purple circle at the top on a black background", ""])
def test_bad_captions_raise(bad):
    with pytest.raises(DMQuantError, match="caption"):
        data.parse_caption(bad)


def test_heldout_pairs_never_in_training_split():
    rng = np.random.default_rng(0)
    train = [data.sample_scene(rng, "train", 0.5) for _ in range(3000)]
    assert not any(s.heldout for s in train)
    seen = {(o.shape, o.color) for s in train for o in s.objects}
    assert seen == {(s, c) for s in data.SHAPES for c in data.COLORS} - data.HELDOUT_PAIRS
    held = [data.sample_scene(rng, "heldout") for _ in range(200)]
    assert all((s.objects[0].shape, s.objects[0].color) in data.HELDOUT_PAIRS for s in held)
    assert {o.shape for o, *_ in (s.objects for s in held)} == set(data.SHAPES)


def test_variants_change_one_attribute():
    cap = "a medium yellow circle at the right on a brown background"
    cands, idx = data.variants(cap, "shape")
    assert cands[idx] == cap and len(cands) == len(data.SHAPES)
    assert "a medium yellow diamond at the right on a brown background" in cands
    cands, idx = data.variants(cap, "color")
    assert cands[idx] == cap and len(cands) == len(data.COLORS)


def test_vocabulary_covers_captions():
    vocab = set(data.vocabulary())
    _, caps = data.make_dataset(200, seed=1, two_object_prob=0.5)
    assert {w for c in caps for w in c.split()} <= vocab
    assert {"circle", "square", "triangle", "red", "green", "blue", "yellow", "white"} <= vocab
