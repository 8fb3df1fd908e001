"""tiny-shapes-flux: the zoo's modern-family model (SD3-style MMDiT, flow matching) loads and generates."""

import numpy as np
import torch

import dmquant
from dmquant.generation import GenerationConfig, generate

PROMPT = "a large red circle at the top left on a black background"


def test_flux_loads_and_generates_deterministically():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = dmquant.zoo.load("tiny-shapes-flux")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.dtype == torch.float32
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 2_000_000
    with torch.no_grad():  # the T5 slot is a stand-in that outputs SD3's "no T5" zeros
        embeds = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)[0]
    assert embeds.shape == (1, 32 + 256, 128) and not embeds[:, 32:].any()
    cfg = GenerationConfig(num_inference_steps=4, guidance_scale=5.0, batch_size=2, progress=False)
    a = generate(pipe, [PROMPT] * 2, cfg, distributed=False)
    b = generate(pipe, [PROMPT] * 2, cfg, distributed=False)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])


def test_identity_layer_makes_sd3s_prompt_states_the_encoders_last_layer():
    from transformers import CLIPTextModel

    from dmquant.zoo import configs
    from dmquant.zoo.tokenizer import build_tokenizer
    from dmquant.zoo.train_flux import text_encoder_with_projection

    folder = configs.WEIGHTS_DIR / "tiny-shapes-sd" / "text_encoder"
    source = CLIPTextModel.from_pretrained(str(folder))
    plain, deeper = text_encoder_with_projection(folder), text_encoder_with_projection(folder, identity_layer=True)
    tokenizer = build_tokenizer()
    ids = tokenizer([PROMPT, ""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        src, a, b = (m(ids, output_hidden_states=True) for m in (source, plain, deeper))
    assert len(b.hidden_states) == len(src.hidden_states) + 1
    assert torch.equal(a.hidden_states[-2], src.hidden_states[-2])  # SD3's states: after the first layer
    assert torch.equal(b.hidden_states[-2], src.hidden_states[-1])  # with the identity layer: after the last
    assert not torch.equal(a.hidden_states[-2], b.hidden_states[-2])
    assert torch.equal(a.text_embeds, b.text_embeds)  # the pooled embedding does not change


def test_adaln_zero_makes_every_block_the_identity_at_start():
    from diffusers import SD3Transformer2DModel

    from dmquant.zoo import configs
    from dmquant.zoo.train_flux import zero_modulation

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**configs.MMDIT).eval()
    zero_modulation(model)
    x, ctx = torch.randn(2, 64, configs.MMDIT["caption_projection_dim"]), torch.randn(2, 5, 64)
    temb = torch.randn(2, configs.MMDIT["caption_projection_dim"])
    with torch.no_grad():
        for block in model.transformer_blocks[:-1]:  # the last block keeps only its image stream
            ctx_out, x_out = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
            assert torch.equal(x_out, x) and torch.equal(ctx_out, ctx)  # gates are zero: the residual alone
        out = model(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 7, 128),
                    pooled_projections=torch.randn(2, 128), timestep=torch.tensor([10.0, 900.0])).sample
    assert out.shape == (2, 4, 8, 8) and not out.any()  # the output projection starts at zero


def test_text_cache_encodes_each_prompt_once_and_matches_the_encoder():
    from dmquant.zoo import configs
    from dmquant.zoo.tokenizer import build_tokenizer
    from dmquant.zoo.train_flux import TextCache, encode_text, text_encoder_with_projection

    encoder = text_encoder_with_projection(configs.WEIGHTS_DIR / "tiny-shapes-sd" / "text_encoder")
    tokenizer = build_tokenizer()
    cache = TextCache(encoder, tokenizer, "cpu")
    first = [PROMPT, "", "a small blue square at the center on a white background", PROMPT]
    seq, pooled = cache(first)
    assert len(cache.seq) == 3  # the repeated prompt is encoded once
    ref_seq, ref_pooled = encode_text(encoder, tokenizer, first, "cpu")
    assert seq.shape == ref_seq.shape == (4, 32, 128) and pooled.shape == ref_pooled.shape == (4, 128)
    assert (seq - ref_seq).abs().max() < 1e-5 and (pooled - ref_pooled).abs().max() < 1e-5
    assert torch.equal(seq[0], seq[3]) and not torch.equal(seq[0], seq[1])
    again, _ = cache(["", PROMPT])  # later batches are lookups of the first encoding
    assert len(cache.seq) == 3 and torch.equal(again[0], seq[1]) and torch.equal(again[1], seq[0])


def test_attribute_variants_are_every_caption_drop_attributes_makes():
    from dmquant.zoo import data
    from dmquant.zoo.train_sd import attribute_variants, drop_attributes

    rng = np.random.default_rng(0)
    caption = "a large red circle at the top left on a black background"
    variants = attribute_variants(caption)
    assert len(variants) == 4 and variants[0] == caption
    seen = {drop_attributes(caption, rng, 0.5, 0.5) for _ in range(200)}
    assert seen == set(variants)  # each variant is drawn, and nothing else is
    plain = "a circle at the top left on a black background"  # no color or size word: one variant
    assert attribute_variants(plain) == [plain]
    assert data.parse_caption(variants[0]).caption == caption
