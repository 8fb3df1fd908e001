import numpy as np
import pytest

import dmquant
from dmquant.errors import DMQuantError
from dmquant.metrics.generation import (
    GenerationConfig,
    generate,
    generate_shard,
    prompt_to_class,
    read_prompts,
    shard_batches,
)


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


def test_one_process_and_two_shards_give_identical_images():
    pipe = dmquant.zoo.load("tiny-shapes-sd")
    prompts = ["a large red circle at the top left on a black background",
               "a small blue triangle in the center on a gray background",
               "a medium white square at the bottom on a brown background",
               "a large green diamond at the right on a black background",
               "a large cyan circle at the left on a brown background"]
    cfg = GenerationConfig(num_inference_steps=3, batch_size=2, seed=5, progress=False)
    whole = generate(pipe, prompts, cfg, distributed=False)
    merged = {**generate_shard(pipe, prompts, cfg, 0, 2), **generate_shard(pipe, prompts, cfg, 1, 2)}
    assert np.array_equal(whole, np.stack([merged[i] for i in range(len(prompts))]))


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\na\n\nb\n  c  \n")
    assert read_prompts(f) == ["a", "b", "c"]
    assert read_prompts(f, 2) == ["a", "b"]
    with pytest.raises(DMQuantError, match="has 3 prompts but 5 images"):
        read_prompts(f, 5)
    with pytest.raises(DMQuantError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_prompts_map_to_dit_classes():
    dit = dmquant.zoo.load("tiny-shapes-dit")
    assert prompt_to_class(dit, "red circle") == dit.labels["red circle"]
    assert prompt_to_class(dit, "a large magenta diamond at the top on a gray background") == dit.labels["magenta diamond"]
    with pytest.raises(DMQuantError, match="labels"):
        prompt_to_class(dit, "a photo of a cat")
