"""Stage ``clip``: the demo's small open_clip model trained contrastively on the scenes (its first
stage and frozen backbone), until validation T2I R@1 stops improving."""
import copy
import json
from pathlib import Path

import numpy as np
import torch

from models.adapter import AdapterConfig, TokenCompressionAdapter
from models.backbone import Backbone, BackboneConfig
from models.checkpoint import CheckpointConfig, save_checkpoint
from models.losses import clip_loss
from training.evaluation import eval_clip
from training.loop import Trainer, fit, load_best
from training.objectives import autocast
from training.scenes import group_batches, same

DEMO_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


def clip_backbone_config(args) -> BackboneConfig:
    model = copy.deepcopy(json.loads(args.clip_config) if args.clip_config else DEMO_CLIP)
    if args.clip_pool:
        model.setdefault("vision_cfg", {})["pool_type"] = args.clip_pool
    return BackboneConfig(model_config=model)


def train_clip(args, data, train_idx, val_idx) -> Path:
    """-> the stage's directory; its ``backbone`` checkpoint holds the best validation weights."""
    out = Path(args.output) / "clip"
    torch.manual_seed(args.seed)
    backbone = Backbone(clip_backbone_config(args)).to(args.device)
    tokenizer = backbone.tokenizer()
    texts = tokenizer(data["captions"]).to(args.device)
    images = data["images"].to(args.device)
    caption_ids = data["caption_ids"].to(args.device)
    trainer = Trainer(args, out, backbone.parameters(), args.lr_clip, args.max_steps_clip or args.max_steps)
    modules = {"backbone": backbone}
    if (out / "done.json").exists():
        return out
    trainer.resume(modules)
    rng = np.random.default_rng([args.seed, trainer.step])
    # "groups" puts a scene's hard variants in one batch: the first stage then learns binding
    # itself (measured: val group accuracy 100%, test R@1 95%) and leaves a reranker no room.
    # "random" batches give the usual bag-of-words CLIP that EDJE is meant to rerank.
    groups = data["groups"] if args.clip_batching == "groups" else np.arange(len(data["groups"]))
    batches = group_batches(train_idx, groups, args.batch_size, rng)

    def step(_):
        idx = next(batches)
        backbone.train()
        with autocast(args.device):
            img = backbone(images[idx])[0]
            txt = backbone.encode_text(texts[idx])
            loss = clip_loss(img, txt, backbone.clip.logit_scale, same(caption_ids, idx))
        return loss, loss.item(), {}

    def evaluate():
        rec = eval_clip(backbone, images, texts, val_idx, data["groups"], args.device)
        return rec["val_t2i_r1"], rec

    trainer.start_clock(args.max_minutes_clip, bool(args.max_steps_clip))
    out_of_time = fit(trainer, "clip", step, evaluate, args.eval_every, modules, [args.lr_clip],
                      list(backbone.parameters()))
    load_best(out, modules, ["backbone"])
    adapter_cfg = AdapterConfig(input_dim=backbone.width, num_heads=1)
    save_checkpoint(out / "backbone", CheckpointConfig(backbone.cfg, adapter_cfg),
                    {"backbone": backbone, "adapter": TokenCompressionAdapter(adapter_cfg)})
    trainer.finish("best_val_t2i_r1", out_of_time)
    return out
