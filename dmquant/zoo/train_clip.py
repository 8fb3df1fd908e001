"""Train tiny-shapes-clip, the zoo's judge: an open_clip model trained contrastively on shapes scenes.

    python -m dmquant.zoo.train_clip            # ~15 min on 2 idle CPU cores (estimated)

Captions that are identical inside a batch count as positives of each other (soft targets); on top,
each image's caption competes with its 9 one-attribute variants (other shape / other color).
Writes dmquant/zoo/weights/tiny-shapes-clip/ (open_clip "local-dir" layout: open_clip_config.json,
open_clip_model.safetensors, tokenizer files, train_log.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dmquant.zoo import _training, configs, data
from dmquant.zoo.tokenizer import build_tokenizer, write_tokenizer_files

NAME = "tiny-shapes-clip"


def build_model(vocab_size: int):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    cfg = configs.clip_model_cfg(vocab_size)
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]), text_cfg=CLIPTextCfg(**cfg["text_cfg"])
    )


def save(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": configs.clip_model_cfg(len(tokenizer)),
        "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in configs.CLIP_PREPROCESS.items()},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    tokenizer.save_pretrained(str(folder))
    write_tokenizer_files(folder)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, caption_ids: torch.Tensor):
    logits = scale * img @ txt.t()
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def hard_negatives(captions: list[str], tokenizer, context_length: int) -> torch.Tensor:
    """Token ids of the captions that differ from each caption only in the first object's shape or color.

    Shape (N, 9, L): 3 other shapes then 6 other colors. They make the judge separate shape and color
    even between captions that agree on everything else, which is how it is used (zero-shot accuracy).
    """
    negs = []
    for cap in captions:
        row = []
        for attr in ("shape", "color"):
            cands, truth = data.variants(cap, attr)
            row += [c for i, c in enumerate(cands) if i != truth]
        negs.append(row)
    flat = [c for row in negs for c in row]
    ids = tokenizer(flat, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt").input_ids
    return ids.view(len(captions), -1, context_length)


def main(argv=None) -> None:
    p = _training.base_parser(__doc__, steps=1500, batch_size=128, lr=1e-3, seed=1)
    p.add_argument("--num-scenes", type=int, default=30000)
    p.add_argument("--split", default="all", choices=data.SPLITS,
                   help="the judge is the measuring instrument: it sees every pair (the generators do not)")
    p.add_argument("--hard-negative-weight", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=configs.WEIGHTS_DIR / NAME)
    args = p.parse_args(argv)
    _training.seed_everything(args.seed, args.threads)

    tokenizer = build_tokenizer()
    images, captions = data.make_dataset(args.num_scenes, seed=args.seed, split=args.split)
    x_all = _training.to_tensor_images(images).to(args.device)
    ids_all = tokenizer(captions, padding="max_length", max_length=configs.CLIP_TEXT["context_length"],
                        truncation=True, return_tensors="pt").input_ids.to(args.device)
    unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cap_id_all = torch.tensor([unique[c] for c in captions]).to(args.device)
    negs_all = hard_negatives(captions, tokenizer, configs.CLIP_TEXT["context_length"]).to(args.device)

    model = build_model(len(tokenizer)).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)
    log = _training.Logger(NAME, args.steps, args.log_every)
    for step in _training.scheduled_steps(opt, args.steps, args.lr):
        idx = torch.randint(len(x_all), (args.batch_size,), generator=gen).to(args.device)
        img = model.encode_image(x_all[idx], normalize=True)
        txt = model.encode_text(ids_all[idx], normalize=True)
        scale = model.logit_scale.exp()
        loss = contrastive_loss(img, txt, scale, cap_id_all[idx])
        if args.hard_negative_weight > 0:  # the true caption (index 0) against its 9 one-attribute variants
            negs = negs_all[idx]
            neg = model.encode_text(negs.flatten(0, 1), normalize=True).view(negs.shape[0], negs.shape[1], -1)
            logits = scale * torch.cat([(img * txt).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", img, neg)], 1)
            zeros = torch.zeros(len(idx), dtype=torch.long, device=logits.device)
            loss = loss + args.hard_negative_weight * F.cross_entropy(logits, zeros)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        log.step(step, loss.item(), scale=model.logit_scale.exp().item())

    model.eval()
    save(model.cpu(), tokenizer, args.out)
    _training.write_train_log(args.out, NAME, args, log)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
