import numpy as np
import pytest

import dmquant
from dmquant.errors import DMQuantError
from dmquant.generation import GenerationConfig, generate, generate_shard, shard_batches
from dmquant.models.tiny import build_tiny_sd_pipeline
from dmquant.prompts import read_prompts

PROMPTS = ["a large red circle at the top left on a black background",
           "a small blue triangle in the center on a gray background",
           "a medium white square at the bottom on a brown background",
           "a large green diamond at the right on a black background",
           "a large cyan circle at the left on a brown background"]


@pytest.fixture(scope="module")
def sd():
    return dmquant.zoo.load("tiny-shapes-sd")


@pytest.mark.parametrize("n,bs,world", [(10, 3, 2), (7, 2, 3), (4, 8, 2), (16, 4, 1)])
def test_shards_partition_the_same_batches(n, bs, world):
    single = shard_batches(n, bs, 0, 1)
    shards = [shard_batches(n, bs, r, world) for r in range(world)]
    flat = sorted(i for s in shards for b in s for i in b)
    assert flat == list(range(n))
    assert sorted(map(tuple, (b for s in shards for b in s))) == sorted(map(tuple, single))


def test_bad_shard_raises():
    with pytest.raises(DMQuantError):
        shard_batches(4, 2, rank=2, world_size=2)


def test_one_process_and_two_shards_give_identical_images(sd):
    cfg = GenerationConfig(num_inference_steps=3, batch_size=2, seed=5, progress=False)
    whole = generate(sd, PROMPTS, cfg, distributed=False)
    merged = {**generate_shard(sd, PROMPTS, cfg, 0, 2), **generate_shard(sd, PROMPTS, cfg, 1, 2)}
    assert whole.dtype == np.uint8 and whole.shape == (5, 32, 32, 3)
    assert np.array_equal(whole, np.stack([merged[i] for i in range(len(PROMPTS))]))


def test_image_i_uses_seed_plus_i(sd):
    cfg = dict(num_inference_steps=2, batch_size=1, progress=False)
    all_images = generate(sd, PROMPTS[:3], GenerationConfig(seed=5, **cfg), distributed=False)
    alone = generate(sd, PROMPTS[2:3], GenerationConfig(seed=7, **cfg), distributed=False)
    assert np.array_equal(all_images[2], alone[0])
    assert not np.array_equal(all_images[0], generate(sd, PROMPTS[:1], GenerationConfig(seed=6, **cfg))[0])


def test_call_kwargs_and_the_pipelines_own_guidance():
    pipe = build_tiny_sd_pipeline()
    cfg = GenerationConfig(num_inference_steps=2, guidance_scale=None, progress=False)
    images = generate(pipe, ["a red circle"], cfg, distributed=False, height=16, width=16)
    assert images.shape == (1, 16, 16, 3)


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\na\n\nb\n  c  \n")
    assert read_prompts(f) == ["a", "b", "c"]
    assert read_prompts(f, 2) == ["a", "b"]
    with pytest.raises(DMQuantError, match="has 3 prompts but 5 images"):
        read_prompts(f, 5)
    with pytest.raises(DMQuantError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
