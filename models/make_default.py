"""Writes a tiny, seeded, *randomly initialised* checkpoint: the embedded default until a trained
one replaced it (``models/default`` now comes from ``scripts/train_demo_cpu.sh``). Its scores mean
nothing; it is a fast stand-in where a test or benchmark needs a real checkpoint of this shape. Run:
``python -m models.make_default --output DIR``.
"""
import argparse

import torch

from models.adapter import AdapterConfig, TokenCompressionAdapter
from models.backbone import Backbone, BackboneConfig
from models.checkpoint import CheckpointConfig, save_checkpoint
from models.joint_encoder import JointEncoder, JointEncoderConfig

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_ADAPTER = AdapterConfig(num_tokens=16, input_dim=128, output_dim=384, num_heads=4, mlp_dim=512)


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = CheckpointConfig(
        backbone=BackboneConfig(model_config=TINY_CLIP),
        adapter=TINY_ADAPTER,
        joint_encoder=JointEncoderConfig(),  # the offline MiniLM, loaded from its package
        description=f"random-init demo model (seed {seed}); its scores mean nothing",
    )
    joint = JointEncoder(cfg.joint_encoder)
    return cfg, Backbone(cfg.backbone), TokenCompressionAdapter(cfg.adapter), joint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg, backbone, adapter, joint = build(args.seed)
    # Only what MiniLM lacks (pooler, head) is stored; its own weights load from the package.
    joint_part = {k: v for k, v in joint.state_dict().items()
                  if k.startswith("head.") or k[len("bert."):] in joint.bert.base_missing_keys}
    fp = save_checkpoint(args.output, cfg, {"backbone": backbone, "adapter": adapter, "joint": joint_part},
                         dtype=torch.float16)
    print(f"wrote {args.output} fingerprint {fp}")


if __name__ == "__main__":
    main()
