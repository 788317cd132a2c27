"""Train EDJE's adapter + joint encoder on image-caption shards (stage ``edje``), or the demo's
backbone and then both on the scenes benchmark (stages ``clip``, ``all``).

    python -m pipeline.train --stage edje --data 'shards/{00000..00999}.tar' --backbone CHECKPOINT_DIR --output RUN
    torchrun --nproc_per_node=8 -m pipeline.train --stage edje --data ... --backbone ... --output RUN --device cuda
    python -m pipeline.train --stage all --data 'scenes/train/*.tar' --output runs/demo   (the scenes recipe)

Stage ``edje``: the backbone (``--backbone``, or the clip stage's) stays frozen. The adapter and
joint encoder (MiniLM's first ``--joint_layers`` layers, or with ``--joint_width`` a narrower BERT
whose embeddings are projected from MiniLM's; word embeddings frozen) learn EDJE's listwise ITM in
both directions: each caption's image against its hardest in-batch images (mined with the frozen
backbone's own embeddings, masking the same image and identical captions) plus a random one, and
likewise for each image over captions. Optional: MLM on the captions (``--mlm_weight``, whole
words by ``--mlm_words``; ``--mlm_only_steps`` of it first) and ``--fusion`` (pairs ranked by
logit + w * first-stage cosine in the loss, w stored in the checkpoint).

Data: ``--loader stream`` (stage edje's default) streams WebDataset shards as img2dataset writes
them (``.jpg``/``.png``/``.webp`` + ``.txt``): shard order and a sample buffer shuffled, decoding
in ``--workers`` DataLoader workers, the backbone run online, memory flat in the corpus size; bad
samples and shards are counted and skipped (``data`` in history.json). ``--loader memory``
(the scenes; the clip stage's) decodes the split once and batches whole scene groups, a scene's
minimal variants first among the negatives. ``--val_data``: held-out shards, evaluated every
``--eval_every`` steps (recall@k, first stage vs reranked).

Under torchrun every process trains a share of each global batch (``--batch_size_edje`` in all):
negatives and the loss span the whole global batch, gradients are averaged by DDP (gloo on CPUs,
NCCL on GPUs), and rank 0 alone writes. Writes ``OUTPUT/checkpoint`` (config.json +
model.safetensors); seeded; a killed run resumes from ``OUTPUT/<stage>/state.pt`` (tensors only)
when rerun with the same command.
"""
import argparse
import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from models.backbone import Backbone
from models.checkpoint import CheckpointError, load_backbone
from models.mlm import RULES as MLM_RULES
from pipeline._cli import add_filesystem_flags, apply_filesystem_flags, finish
from training import distributed
from training.build import CLASS_RULES
from training.clip_stage import clip_backbone_config, train_clip
from training.edje_stage import train_edje
from training.evaluation import test_split_gains

log = logging.getLogger("train")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["clip", "edje", "all"], default="all")
    ap.add_argument("--data", required=True, help="training shards (image + .txt caption per sample, as img2dataset "
                    "writes them; or pipeline.make_scenes --split train): braces, globs, commas; local paths or "
                    "gs://, s3:// URLs")
    ap.add_argument("--loader", choices=["stream", "memory"], default=None,
                    help="stream: shards streamed through DataLoader workers, the backbone run online (default of "
                         "--stage edje); memory: every sample decoded once and held in memory, batches of whole "
                         "scene groups (the scenes; required by the clip stage)")
    ap.add_argument("--val_data", default=None,
                    help="with --loader stream: held-out shards, evaluated every --eval_every(_edje) steps with "
                         "recall@k (first stage vs reranked); the best evaluation's weights are the checkpoint")
    ap.add_argument("--val_samples", type=int, default=1000, help="held-out samples read from --val_data (0: all)")
    ap.add_argument("--val_top_k", type=int, default=20, help="first-stage candidates reranked per held-out caption")
    ap.add_argument("--workers", type=int, default=2,
                    help="with --loader stream: DataLoader worker processes per training process (0: decode in it)")
    ap.add_argument("--shuffle_buffer", type=int, default=1000,
                    help="with --loader stream: samples each worker holds to shuffle over (raw bytes)")
    ap.add_argument("--accumulate", type=int, default=1,
                    help="batches whose gradients add up in one optimizer step (negatives stay within a batch)")
    ap.add_argument("--teacher", default=None,
                    help="a trained checkpoint on the same backbone whose pair scores the joint encoder also "
                         "learns (EDJE's distillation), e.g. one trained with --num_tokens equal to the "
                         "backbone's patch count (no compression)")
    ap.add_argument("--distill_weight", type=float, default=1.0,
                    help="with --teacher: weight of the distillation term (binary cross-entropy of every "
                         "scored pair's logit against the teacher's match probability)")
    ap.add_argument("--save_every", type=int, default=0,
                    help="> 0: also save the resumable state every this many steps between evaluations")
    ap.add_argument("--output", required=True, help="run directory; the checkpoint lands in OUTPUT/checkpoint")
    ap.add_argument("--backbone", default=None,
                    help="with --stage edje: a checkpoint directory whose backbone is the frozen backbone "
                         "(default: OUTPUT/clip/backbone, the clip stage's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N samples (quick runs)")
    ap.add_argument("--val_fraction", type=float, default=0.05)
    ap.add_argument("--clip_config", default=None, help="open_clip model config as JSON (default: the demo's)")
    ap.add_argument("--batch_size", type=int, default=256, help="clip stage batch (whole scene groups)")
    ap.add_argument("--batch_size_edje", type=int, default=64,
                    help="edje stage batch: the global batch over all processes (each takes an equal share)")
    ap.add_argument("--clip_batching", choices=["random", "groups"], default="random",
                    help="clip stage batches: random samples (a bag-of-words first stage, as web-trained "
                         "CLIPs are) or whole scene groups (hard negatives in batch)")
    ap.add_argument("--edje_batching", choices=["groups", "neighbours"], default="groups",
                    help="edje stage batches: random whole scene groups, or groups that are near neighbours "
                         "under the frozen backbone (harder in-batch negatives, like a reranker's candidates)")
    ap.add_argument("--neighbour_share", type=float, default=0.5,
                    help="with --edje_batching neighbours: the share of each batch taken from one group's "
                         "nearest groups (the rest random groups, whose easy negatives keep the scorer "
                         "from collapsing to a constant)")
    ap.add_argument("--clip_pool", choices=["tok", "avg"], default=None,
                    help="image embedding of the clip stage: the class token (open_clip's default) or the "
                         "mean of the patch tokens, which trains every patch token to say what it shows")
    ap.add_argument("--lr_clip", type=float, default=1e-3)
    ap.add_argument("--lr_adapter", type=float, default=3e-4)
    ap.add_argument("--lr_joint", type=float, default=5e-5)
    ap.add_argument("--weight_decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--max_steps", type=int, default=100_000,
                    help="steps of each stage without its own --max_steps_clip/_edje: the learning-rate "
                         "schedule's length")
    ap.add_argument("--max_steps_clip", type=int, default=0, help="> 0: the clip stage's steps")
    ap.add_argument("--max_steps_edje", type=int, default=0, help="> 0: the edje stage's steps")
    ap.add_argument("--max_minutes_clip", type=float, default=4.0,
                    help="time cap of the clip stage: it stops there, and the learning rate decays by "
                         "time instead of steps wherever time runs ahead")
    ap.add_argument("--max_minutes_edje", type=float, default=5.0, help="likewise for the edje stage")
    ap.add_argument("--eval_every", type=int, default=200)
    ap.add_argument("--eval_every_edje", type=int, default=0, help="> 0: the edje stage's own --eval_every")
    ap.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping")
    ap.add_argument("--num_tokens", type=int, default=16, help="adapter output tokens m")
    ap.add_argument("--adapter_positions", action="store_true",
                    help="add 2-D position codes to the patch tokens the adapter attends over")
    ap.add_argument("--adapter_cells", action="store_true",
                    help="each adapter query reads only its own cell of the image (a grid of num_tokens cells)")
    ap.add_argument("--adapter_output_positions", action="store_true",
                    help="add learned row and column embeddings to the adapter's output tokens")
    ap.add_argument("--adapter_position_words", action="store_true",
                    help="with --adapter_output_positions: start the row/column embeddings at the joint "
                         "encoder's word embeddings of left/right (columns) and above, top/below, bottom (rows)")
    ap.add_argument("--adapter_output_norm", type=float, default=0.0,
                    help="> 0: end the adapter with a LayerNorm whose gain starts here (MiniLM's word "
                         "embeddings: ~0.055 per element), so the joint encoder's position embeddings are not drowned")
    ap.add_argument("--adapter_locality", type=float, default=0.0,
                    help="> 0: lay the adapter's queries out on a grid, each starting out attending to its "
                         "own cell (Gaussian prior of this width in cells, learnable; implies position codes)")
    ap.add_argument("--joint_layers", type=int, default=3, help="MiniLM layers kept in the joint encoder")
    ap.add_argument("--text_layers", type=int, default=0,
                    help="> 0: the first this many of the --joint_layers read the caption alone (computed "
                         "once per caption); the image tokens join the layers above them")
    ap.add_argument("--frozen_text_layers", type=int, default=None,
                    help="with --text_layers: the lowest this many stay MiniLM's, frozen and not stored in "
                         "the checkpoint (default: all of the text layers; 0 trains them all)")
    ap.add_argument("--joint_width", type=int, default=0,
                    help="> 0: a narrower joint encoder of this width (MiniLM's vocabulary, embeddings "
                         "projected from MiniLM's, stored in the checkpoint) instead of MiniLM's own 384")
    ap.add_argument("--max_text_tokens", type=int, default=32)
    ap.add_argument("--image_positions", choices=["after_text", "fixed"], default="after_text",
                    help="BERT position ids of the image tokens: right after the text (they shift with "
                         "its length) or fixed, from max_text_tokens on")
    ap.add_argument("--hard_negatives", type=int, default=3)
    ap.add_argument("--sibling_negatives", action=argparse.BooleanOptionalAction, default=True,
                    help="after the random-only steps, a scene's minimal variants (same group) are taken "
                         "first among the --hard_negatives, then the backbone's hardest")
    ap.add_argument("--mlm_weight", type=float, default=0.0,
                    help="> 0: add the MLM objective on the captions (read with their own image), this weight")
    ap.add_argument("--mlm_probability", type=float, default=0.5,
                    help="share of the maskable caption words masked for MLM (whole words; EDJE masks 50%%)")
    ap.add_argument("--mlm_words", choices=[*MLM_RULES, *CLASS_RULES], default="content",
                    help="which words MLM may mask: all, content (never a, the, of, ...), spatial "
                         "(left, right, above, below, top, bottom), or classes (the scenes' word classes: "
                         "each caption masks all its colour, or shape, size or spatial words at once), or "
                         "objects (classes, plus one more choice: all colour, shape and size words at once, "
                         "so that only the relation says which object is which)")
    ap.add_argument("--mlm_only_steps", type=int, default=0,
                    help="curriculum: this many MLM-only steps (captions read with their own image) before ITM")
    ap.add_argument("--mlm_step_cost", type=float, default=1.0,
                    help="the edje stage's learning-rate schedule counts an MLM-only step as this share of "
                         "an ITM step (their time ratio, ~0.45 on a CPU), so the ITM phase starts at a "
                         "higher rate")
    ap.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=False,
                    help="rank pairs by logit + w * first-stage cosine inside the listwise loss (w learnt, "
                         "stored in the checkpoint; rerank then ranks by the same sum)")
    ap.add_argument("--random_only_steps", type=int, default=300, help="curriculum: random negatives first")
    ap.add_argument("--description", default="EDJE demo checkpoint trained on the compositional scenes benchmark")
    ap.add_argument("--test_data", default=None, help="scene shards of a test split, or of several (one directory each): report each split's rerank gain at the end")
    fs_flags = add_filesystem_flags(ap)
    args = ap.parse_args(argv)
    apply_filesystem_flags(args, fs_flags)
    if args.joint_width < 0 or args.joint_width % 32:
        ap.error("--joint_width must be a multiple of 32 (attention heads of width 32)")
    if not 0 < args.neighbour_share <= 1:
        ap.error("--neighbour_share must be in (0, 1]")
    if args.text_layers and args.text_layers >= args.joint_layers:
        ap.error(f"--text_layers {args.text_layers} leaves none of the --joint_layers {args.joint_layers} joint")
    if args.frozen_text_layers is not None and not 0 <= args.frozen_text_layers <= args.text_layers:
        ap.error("--frozen_text_layers must be between 0 and --text_layers")
    if args.frozen_text_layers and args.joint_width:
        ap.error("--frozen_text_layers: a --joint_width encoder has no MiniLM layers to keep")
    if args.adapter_position_words and not args.adapter_output_positions:
        ap.error("--adapter_position_words needs --adapter_output_positions")
    if args.loader is None:
        args.loader = "memory" if args.stage in ("clip", "all") else "stream"
    if args.loader == "stream" and args.stage != "edje":
        ap.error("--loader stream trains the edje stage only: use --stage edje with --backbone")
    if args.loader == "stream" and args.mlm_words in CLASS_RULES:
        ap.error(f"--mlm_words {args.mlm_words} uses the scenes' word classes: use it with --loader memory")
    if args.val_data and args.loader != "stream":
        ap.error("--val_data is for --loader stream (the scenes validate on held-out scene groups)")
    if args.teacher and args.stage != "edje" and args.stage != "all":
        ap.error("--teacher is for the edje stage")
    if args.accumulate < 1 or args.workers < 0 or args.save_every < 0:
        ap.error("--accumulate must be >= 1, --workers and --save_every >= 0")
    if args.mlm_step_cost <= 0:
        ap.error("--mlm_step_cost must be > 0")
    if not 0 < args.mlm_probability <= 1:
        ap.error("--mlm_probability must be in (0, 1]")
    return args


@contextlib.contextmanager
def deterministic(device: str):
    """On the CPU, torch's deterministic kernels: a seeded run then writes the same checkpoint bit
    for bit (by default some backward passes accumulate in a thread-dependent order; measured: no
    slower here). CUDA keeps its fast kernels."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(before or device == "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def run(argv=None):
    args = parse_args(argv)
    world = distributed.init(args.device)
    args.device = distributed.device_for(args.device, world)
    try:
        with deterministic(args.device):
            return _run(args, world)
    finally:
        distributed.close(world)


def _run(args, world):
    torch.manual_seed(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (DataLoader workers fork after the tokenizer ran)
    if world.main:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    if args.backbone and args.stage != "edje":
        raise SystemExit("error: --backbone replaces the clip stage: use it with --stage edje")
    if args.stage == "edje" and not args.backbone:
        if not (Path(args.output) / "clip" / "backbone").exists():
            raise SystemExit("error: --stage edje needs --backbone (a checkpoint directory), or a clip stage "
                             "already run into OUTPUT/clip")
    if world.size > 1 and args.stage != "edje":
        raise SystemExit("error: the clip stage runs in one process: use torchrun with --stage edje")
    if args.batch_size_edje % world.size:
        raise SystemExit(f"error: --batch_size_edje {args.batch_size_edje} does not split over {world.size} processes")
    if args.loader == "memory":
        return _run_scenes(args, world)
    return _run_stream(args, world)


def _backbone(args, path):
    torch.manual_seed(args.seed + 1)  # (before the backbone is built: its modules draw from the same stream)
    try:
        return load_backbone(path, args.device)
    except (CheckpointError, OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: --backbone {path}: {e}") from None


def _run_scenes(args, world):
    from training.scenes import load_scenes, split_validation
    if args.backbone:
        from models.checkpoint import read_config
        try:
            backbone_cfg = read_config(args.backbone).backbone
        except (CheckpointError, OSError) as e:
            raise SystemExit(f"error: --backbone {args.backbone}: {e}") from None
    else:
        backbone_cfg = clip_backbone_config(args)
    transform = Backbone(backbone_cfg, load_pretrained=False).image_transform()
    data = load_scenes(args.data, transform, args.limit)
    train_idx, val_idx = split_validation(data["groups"], args.val_fraction)
    log.info("%d training samples (%d validation)", len(train_idx), len(val_idx))
    clip_dir = Path(args.output) / "clip"
    if args.stage in ("clip", "all"):
        clip_dir = train_clip(args, data, train_idx, val_idx)
    if args.stage == "clip":
        return clip_dir
    backbone = _backbone(args, Path(args.backbone) if args.backbone else clip_dir / "backbone")
    final = train_edje(args, backbone, world, scenes=(data, train_idx, val_idx))
    if args.test_data and world.main:
        metrics = test_split_gains(final, args.test_data, args.device)
        (Path(args.output) / "test_metrics.json").write_text(json.dumps(metrics, indent=1))
        log.info("test split: %s", metrics)
    return final


def _run_stream(args, world):
    from training.evaluation import HeldOut
    from training.objectives import autocast
    from training.scenes import training_shards
    from training.stream import ShardStream, StreamBatches
    shards = training_shards(args.data)
    if not shards:
        raise SystemExit(f"error: --data {args.data}: no shards")
    backbone = _backbone(args, args.backbone or Path(args.output) / "clip" / "backbone")
    held_out = HeldOut(args.val_data, backbone.image_transform(), args.val_samples, args.val_top_k) \
        if args.val_data and world.main else None
    from models.joint_encoder import Tokenizer
    from training.build import joint_encoder_config
    tokenizer = Tokenizer(joint_encoder_config(args))
    captions = _CaptionTables(tokenizer, args.mlm_words)

    def stream(step):
        s = ShardStream(shards, backbone.image_transform(), captions, backbone.tokenizer(),
                        args.batch_size_edje // world.size, args.seed, world, args.shuffle_buffer, start=step)
        return StreamBatches(s, backbone, args.device, autocast, args.workers)
    return train_edje(args, backbone, world, stream=stream, held_out=held_out)


class _CaptionTables:
    """Picklable caption -> (ids, mask, words) for DataLoader workers."""

    def __init__(self, tokenizer, rule):
        self.tokenizer, self.rule = tokenizer, rule

    def __call__(self, captions):
        import torch.nn.functional as F
        from training.build import caption_tables
        ids, mask, words = caption_tables(self.tokenizer, captions, self.rule)
        # one width for every batch, so that processes can gather each other's (the loss trims it)
        pad = self.tokenizer.max_tokens - ids.shape[1]
        return (F.pad(ids, (0, pad), value=self.tokenizer.tok.pad_token_id), F.pad(mask, (0, pad)),
                F.pad(words, (0, pad), value=-1))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(run(argv))


if __name__ == "__main__":
    main()
    finish(0)
