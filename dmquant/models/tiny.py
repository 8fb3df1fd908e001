"""Tiny random-weight pipelines built from configs, offline: for tests and quick checks.

They have the real diffusers classes (UNet2DConditionModel with cross-attention, DiTTransformer2DModel,
FLUX's and SD3's MMDiT transformers with their CLIP and T5 text encoders, Qwen-Image, and the video
pipelines Wan, LTX-Video, CogVideoX and HunyuanVideo with their own VAEs) at toy sizes, so every code path
of dmquant runs on them in seconds. Tokenizers are built in memory (single-character vocabularies; for
HunyuanVideo's Llama, the words of its prompt template too, so the template's ``crop_start`` holds).
"""

from __future__ import annotations

import json
import re
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

TINY_NAMES = ("tiny-random-sd", "tiny-random-dit", "tiny-random-flux", "tiny-random-sd3", "tiny-random-qwen-image",
              "tiny-random-wan", "tiny-random-ltx", "tiny-random-cogvideox", "tiny-random-hunyuan-video")


def char_tokenizer(folder: str | Path | None = None, model_max_length: int = 32):
    """A CLIPTokenizer whose vocabulary is single characters (built offline, no download)."""

    folder = Path(folder or tempfile.mkdtemp(prefix="dmquant-tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ",.-'")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


def char_t5_tokenizer(model_max_length: int = 32):
    """A T5-style fast tokenizer (single characters and words split on spaces, ``</s>`` appended, ``<pad>``
    padding) made in memory with the ``tokenizers`` library: no download, no sentencepiece model."""
    chars = list(string.ascii_lowercase + string.digits + ",.-'")
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=1))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Split("", "isolated")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def char_chat_tokenizer():
    """A Qwen-style chat tokenizer (``<|im_start|>`` / ``<|im_end|>`` special tokens, ``<|endoftext|>``
    padding, single characters otherwise) made in memory: no download."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>",
                                     continuing_subword_prefix="", max_input_chars_per_word=1))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Split("", "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=specials[1:3], model_max_length=1 << 12)


# Llama 3's pre-tokenizer split (words with their leading space, digits in threes, punctuation runs, newlines)
LLAMA_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<unk>")


def char_llama_tokenizer(template: str = DEFAULT_PROMPT_TEMPLATE["template"]):
    """A Llama-3-style tokenizer made in memory: Llama 3's pre-tokenizer split, the chat special tokens, a
    vocabulary of the words of ``template`` (HunyuanVideo's prompt template) plus single characters for any
    other text. The template's text before ``{}`` tokenizes to as many tokens as with Llama 3 (95 for
    HunyuanVideo's default, its ``crop_start``), so the pipeline crops exactly the template off."""
    split = pre_tokenizers.Split(Regex(LLAMA_SPLIT), behavior="isolated")
    words = {piece for part in re.split("|".join(map(re.escape, LLAMA_SPECIALS)), template.replace("{}", ""))
             for piece, _ in split.pre_tokenize_str(part)}
    vocab = {t: i for i, t in enumerate([*LLAMA_SPECIALS, *sorted(words | set(string.printable))])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=64))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA_SPECIALS[0], pad_token=LLAMA_SPECIALS[1],
                                   eos_token="<|eot_id|>", unk_token="<unk>",
                                   additional_special_tokens=list(LLAMA_SPECIALS[2:5]), model_max_length=1 << 12)


def _tiny_vae(**kwargs):

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16, **kwargs,
    )


def _tiny_clip(tokenizer, cls=CLIPTextModel, hidden_size: int = 32, positions: int = 32, **kwargs):
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=positions, bos_token_id=0, eos_token_id=1, pad_token_id=1, **kwargs,
    ))


def _tiny_t5(tokenizer, d_model: int = 32):
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def build_tiny_sd_pipeline(seed: int = 0):
    """A random-weight StableDiffusionPipeline: 16×16 images, 8×8×4 latents, a 2-level UNet."""

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    text_encoder = _tiny_clip(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _eval_mode(pipe)


def _eval_mode(pipe):
    """Models built from configs start in training mode (label dropout!); pipelines run in eval mode."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def build_tiny_dit_pipeline(seed: int = 0, attention_head_dim: int = 16):
    """A random-weight class-conditioned DiTPipeline on 8×8×4 latents (patch 2, 2 blocks)."""

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=attention_head_dim, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )
    scheduler = DDIMScheduler(clip_sample=False)
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=scheduler,
                       id2label={i: f"class {i}" for i in range(10)})
    return _eval_mode(pipe)


def build_tiny_flux_pipeline(seed: int = 0):
    """A random-weight FluxPipeline: CLIP + T5 text encoders, a 1 + 1 block FLUX transformer with guidance
    embedding; 16×16 images, 8×8×4 latents packed into 4×4 tokens of 16 channels."""

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_tokenizer(), char_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_vae(shift_factor=0.0), text_encoder=_tiny_clip(tokenizer),
                        tokenizer=tokenizer, text_encoder_2=_tiny_t5(tokenizer_2), tokenizer_2=tokenizer_2,
                        transformer=transformer)
    return _eval_mode(pipe)


def build_tiny_sd3_pipeline(seed: int = 0):
    """A random-weight StableDiffusion3Pipeline: two CLIP text encoders with projection and a T5, a 2-block
    SD3 (MMDiT) transformer; 16×16 images, 8×8×4 latents in 2×2 patches."""

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = char_tokenizer(), char_tokenizer(), char_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(shift_factor=0.0),
        text_encoder=_tiny_clip(tokenizer, CLIPTextModelWithProjection, 16, projection_dim=16), tokenizer=tokenizer,
        text_encoder_2=_tiny_clip(tokenizer_2, CLIPTextModelWithProjection, 16, projection_dim=16),
        tokenizer_2=tokenizer_2, text_encoder_3=_tiny_t5(tokenizer_3), tokenizer_3=tokenizer_3,
    )
    return _eval_mode(pipe)


def build_tiny_qwen_image_pipeline(seed: int = 0):
    """A random-weight QwenImagePipeline: a 2-layer Qwen2.5-VL text encoder, a 2-block Qwen-Image
    transformer and the Qwen-Image VAE (scale factor 8 with packing); 32×32 images, 4×4 latent tokens."""

    torch.manual_seed(seed)
    tokenizer = char_chat_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), vision_start_token_id=len(tokenizer) - 3,
        vision_end_token_id=len(tokenizer) - 2, vision_token_id=len(tokenizer) - 1,
    ))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    return _eval_mode(pipe)


def build_tiny_wan_pipeline(seed: int = 0):
    """A random-weight text-to-video WanPipeline: a UMT5 text encoder, a 2-block Wan transformer and the
    Wan VAE (4× in time, 8× in space); e.g. 5 frames of 16×16 (2 latent frames of 2×2 ×16 channels)."""

    torch.manual_seed(seed)
    tokenizer = char_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    return _eval_mode(pipe)


def build_tiny_ltx_pipeline(seed: int = 0):
    """A random-weight LTXPipeline: a T5 text encoder, a 2-block LTX-Video transformer and the LTX VAE at
    8× in space and in time (LTX wants sides divisible by 32): e.g. 9 frames of 32×32 (2 × 4×4 latent tokens)."""

    torch.manual_seed(seed)
    tokenizer = char_t5_tokenizer(128)  # the pipeline's max_sequence_length
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                                             num_layers=2, caption_channels=32)
    scaling, layers = (True, True, True, False), (1, 1, 1, 1, 1)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                spatio_temporal_scaling=scaling, decoder_spatio_temporal_scaling=scaling,
                                layers_per_block=layers, decoder_layers_per_block=layers,
                                decoder_inject_noise=(False,) * 5, patch_size=1, patch_size_t=1)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_tiny_t5(tokenizer),
                       tokenizer=tokenizer, transformer=transformer)
    return _eval_mode(pipe)


def build_tiny_cogvideox_pipeline(seed: int = 0):
    """A random-weight CogVideoXPipeline: a T5 text encoder, a 2-block CogVideoX transformer with rotary
    embeddings (any text length: the pipeline pads to 226 tokens) and the CogVideoX VAE at 4× in space and
    in time; e.g. 9 frames of 16×16 (3 latent frames of 2×2 tokens), v-prediction DDIM."""

    torch.manual_seed(seed)
    tokenizer = char_t5_tokenizer(226)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_tiny_t5(tokenizer), vae=vae, transformer=transformer,
                             scheduler=scheduler)
    return _eval_mode(pipe)


def build_tiny_hunyuan_video_pipeline(seed: int = 0):
    """A random-weight HunyuanVideoPipeline: a 2-layer Llama text encoder (its tokenizer keeps the prompt
    template's ``crop_start``) and a CLIP for the pooled text, a 1 + 1 block HunyuanVideo transformer with
    embedded guidance and the HunyuanVideo VAE at 4× in space and in time; e.g. 9 frames of 16×16."""

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = char_llama_tokenizer(), char_tokenizer(model_max_length=77)  # CLIP: 77 tokens
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=4, pad_token_id=1,
    ))
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8),
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                    norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=_tiny_clip(tokenizer_2, positions=77), tokenizer_2=tokenizer_2)
    return _eval_mode(pipe)


_BUILDERS = {"tiny-random-sd": build_tiny_sd_pipeline, "tiny-random-dit": build_tiny_dit_pipeline,
             "tiny-random-flux": build_tiny_flux_pipeline, "tiny-random-sd3": build_tiny_sd3_pipeline,
             "tiny-random-qwen-image": build_tiny_qwen_image_pipeline, "tiny-random-wan": build_tiny_wan_pipeline,
             "tiny-random-ltx": build_tiny_ltx_pipeline, "tiny-random-cogvideox": build_tiny_cogvideox_pipeline,
             "tiny-random-hunyuan-video": build_tiny_hunyuan_video_pipeline}


def build_tiny_pipeline(name: str, seed: int = 0):
    if name not in _BUILDERS:
        raise KeyError(name)
    return _BUILDERS[name](seed)
