"""Stage ``edje``: the frozen backbone's patch tokens -> adapter + joint encoder, trained with
listwise ITM in both directions (mined + random negatives), optional grounded MLM and fusion with
the first stage; from the scenes in memory or from streamed shards, in one process or many."""
import contextlib
import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from models.adapter import TokenCompressionAdapter
from models.checkpoint import CheckpointConfig, save_checkpoint
from models.joint_encoder import JointEncoder, Tokenizer
from models.losses import MaskedLMHead
from models.mlm import Mlm
from training import build
from training.batches import MemoryBatches
from training.distributed import World
from training.evaluation import eval_edje, eval_grounding, grounding_rows, warn_if_ungrounded
from training.loop import Trainer, fit, load_best
from training.objectives import EdjeObjective, Fusion, autocast
from training.scenes import group_batches, neighbour_batches

log = logging.getLogger("train")


@dataclasses.dataclass
class Parts:
    """What the stage trains and how: modules, optimizer groups, configs."""
    adapter: TokenCompressionAdapter
    joint: JointEncoder
    tokenizer: Tokenizer
    mlm: Mlm
    fusion: Fusion
    params: list
    base_lrs: list
    modules: dict
    adapter_cfg: object
    joint_cfg: object


def build_parts(args, backbone) -> Parts:
    adapter_cfg = build.adapter_config(args, backbone)
    joint_cfg = build.joint_encoder_config(args)
    adapter = TokenCompressionAdapter(adapter_cfg).to(args.device)
    joint = JointEncoder(joint_cfg)
    if args.joint_width:
        build.init_from_minilm(joint.bert)
    joint = joint.to(args.device)
    joint.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # MiniLM's, or their projection
    frozen_layers = build.frozen_text_layers(args)
    if frozen_layers:
        # MiniLM's own first steps of parsing the caption: no backward through them, and they load
        # from the package (not stored)
        for module in (joint.bert.embeddings, *joint.bert.encoder.layer[:frozen_layers]):
            module.requires_grad_(False)
    tokenizer = Tokenizer(joint_cfg)
    if args.adapter_position_words:
        build.init_position_words(adapter, tokenizer, joint.bert.embeddings.word_embeddings.weight)
    params = [{"params": adapter.parameters(), "lr": args.lr_adapter},
              {"params": [p for p in joint.bert.parameters() if p.requires_grad], "lr": args.lr_joint},
              {"params": joint.head.parameters(), "lr": args.lr_adapter}]
    base_lrs = [args.lr_adapter, args.lr_joint, args.lr_adapter]
    modules = {"adapter": adapter, "joint": joint}
    mlm = fusion = None
    if args.mlm_weight or args.mlm_only_steps:
        mlm = Mlm(MaskedLMHead(joint.bert.embeddings.word_embeddings, joint.bert.config.layer_norm_eps).to(args.device),
                  tokenizer.tok.mask_token_id, args.mlm_weight, args.mlm_probability,
                  args.mlm_words in build.CLASS_RULES, build.OBJECT_CLASSES if args.mlm_words == "objects" else ())
        params.append({"params": mlm.head.parameters(), "lr": args.lr_adapter})
        base_lrs.append(args.lr_adapter)
        modules["mlm"] = mlm.head
    if args.fusion:
        # starts as the first stage's own softmax temperature: at first the pair ranks as the first stage ranks it
        fusion = Fusion(float(backbone.clip.logit_scale.exp().clamp(max=100))).to(args.device)
        params.append({"params": fusion.parameters(), "lr": args.lr_adapter})
        base_lrs.append(args.lr_adapter)
        modules["fusion"] = fusion
    return Parts(adapter, joint, tokenizer, mlm, fusion, params, base_lrs, modules, adapter_cfg, joint_cfg)


def train_edje(args, backbone, world: World, scenes=None, stream=None, held_out=None) -> Path:
    """Trains from ``scenes`` ((data, train_idx, val_idx): the scenes in memory, scene-group
    batches) or from ``stream`` (a function of the resumed step -> ``stream.StreamBatches``, with
    ``held_out``: a ``evaluation.HeldOut`` or None). Writes OUTPUT/checkpoint; returns its path."""
    out = Path(args.output) / "edje"
    memory = None
    if scenes is not None:
        data, train_idx, val_idx = scenes
        memory = _cache_scenes(backbone, data, args.device)
    parts = build_parts(args, backbone)
    grounding = None
    if memory is not None:
        captions = data["captions"]
        ids, mask, words = (t.to(args.device) for t in build.caption_tables(parts.tokenizer, captions, args.mlm_words))
        source = MemoryBatches(memory["patch"], memory["img_emb"], memory["txt_emb"], ids, mask, words,
                               data["caption_ids"].to(args.device), data["groups"], world)
        if parts.mlm is not None:
            rows = grounding_rows(val_idx)
            grounding = tuple(t.to(args.device) for t in (
                *build.scene_word_classes(parts.tokenizer, [captions[i] for i in rows]), torch.as_tensor(rows)))
    # An MLM-only step costs ~0.45 of an ITM step on a CPU; counting it so (--mlm_step_cost) starts
    # a step-budget ITM phase at the rate a time-boxed schedule gave it (docs/experiments.md,
    # run set R8: whether ITM takes off was decided by the backbone's MLM grounding, not this rate).
    m, cost = args.mlm_only_steps, args.mlm_step_cost
    trainer = Trainer(args, out, parts.params, args.lr_joint, args.max_steps_edje or args.max_steps,
                      work=lambda s: cost * min(s, m) + max(0, s - m), world=world)
    teacher = load_teacher(args.teacher, backbone, parts.joint_cfg, args.device) if args.teacher else None
    objective = EdjeObjective(parts.adapter, parts.joint, parts.mlm, parts.fusion, args.sibling_negatives, world,
                              teacher, args.distill_weight)
    model = objective
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[world.local_rank] if args.device.startswith("cuda") else None,
            find_unused_parameters=True)
    if not (out / "done.json").exists():
        trainer.resume(parts.modules)
        rng = np.random.default_rng([args.seed, 1, trainer.step])
        gen = torch.Generator(device=args.device).manual_seed(args.seed + trainer.step)
        if memory is not None:
            batches = group_batches(train_idx, data["groups"], args.batch_size_edje, rng)
            # Near-neighbour batches from the start leave no easy pair to learn from (measured: the
            # scorer collapses to a constant), so they follow the random-negative steps.
            near = (neighbour_batches(train_idx, data["groups"], memory["img_emb"], args.batch_size_edje, rng,
                                      args.neighbour_share)
                    if args.edje_batching == "neighbours" else batches)
            easy_batch, hard_batch = (lambda: source.batch(next(batches))), (lambda: source.batch(next(near)))
            evaluate = _scenes_eval(args, parts, memory, source, val_idx, data, grounding, trainer)
            counters = None
        else:
            streamed = stream(trainer.step)
            easy_batch = hard_batch = streamed.next
            evaluate = _stream_eval(args, parts, backbone, held_out)
            counters = streamed.counters

        def step(s):
            warm = s < args.mlm_only_steps
            easy = s < args.mlm_only_steps + args.random_only_steps
            batch = easy_batch() if easy else hard_batch()
            objective.train()
            loss, (acc, value) = model(batch, 0 if easy else args.hard_negatives, gen, itm=not warm,
                                       mlm_weight=args.mlm_weight if parts.mlm is not None else 0.0)
            return loss, value, {"acc": f"{acc:.2f}"}

        trainer.start_clock(args.max_minutes_edje, bool(args.max_steps_edje))
        has_val = memory is not None or held_out is not None
        out_of_time = fit(trainer, "edje", step, evaluate, args.eval_every_edje or args.eval_every, parts.modules,
                          parts.base_lrs, [p for g in parts.params for p in g["params"]],
                          extra_evals={args.mlm_only_steps} if args.mlm_only_steps else set(),
                          counts=lambda s: has_val and s > args.mlm_only_steps, save_every=args.save_every,
                          accumulate=args.accumulate, no_sync=getattr(model, "no_sync", contextlib.nullcontext),
                          counters=counters)
        trainer.finish("best_val_group_acc" if memory is not None else "best_val_t2i_r1", out_of_time)
    return _write_checkpoint(args, backbone, parts, out, world)


def load_teacher(path, backbone, joint_cfg, device):
    """(adapter, joint encoder) of a trained checkpoint on the same backbone, frozen; refused (before
    training) when its tokens would come from other patch tokens or its captions from another tokenizer."""
    from models.checkpoint import CheckpointError, load_joint_encoder, load_vision_encoder
    try:
        encoder, cfg, _ = load_vision_encoder(path, device)
        joint, _, _, _ = load_joint_encoder(path, device)
    except (CheckpointError, OSError) as e:
        raise SystemExit(f"error: --teacher {path}: {e}") from None
    mine, theirs = backbone.state_dict(), encoder.backbone.state_dict()
    if cfg.backbone.to_dict() != backbone.cfg.to_dict() or mine.keys() != theirs.keys() or any(
            not torch.allclose(mine[k].float(), theirs[k].float(), rtol=1e-3, atol=1e-3) for k in mine):  # (fp16-stored)
        raise SystemExit(f"error: --teacher {path}: its backbone is not --backbone's, so its adapter would read "
                         f"other patch tokens")
    t = cfg.joint_encoder
    if t.tokenizer_path() != joint_cfg.tokenizer_path() or \
            t.max_text_tokens != joint_cfg.max_text_tokens:
        raise SystemExit(f"error: --teacher {path}: its joint encoder reads captions with another tokenizer or "
                         f"--max_text_tokens ({t.max_text_tokens})")
    log.info("distilling from %s (%d image tokens per image)", path, cfg.adapter.num_tokens)
    return encoder.adapter.eval(), joint.eval()


@torch.no_grad()
def _cache_scenes(backbone, data, device) -> dict:
    """Every scene image's patch tokens and both first-stage embeddings, computed once."""
    tok_clip = backbone.tokenizer()
    with autocast(device):
        patch, img_emb, txt_emb = [], [], []
        for i in range(0, len(data["keys"]), 512):
            e, p = backbone(data["images"][i:i + 512].to(device))
            patch.append(p.float())
            img_emb.append(e.float())
            txt_emb.append(backbone.encode_text(tok_clip(data["captions"][i:i + 512]).to(device)).float())
    return {"patch": torch.cat(patch), "img_emb": torch.cat(img_emb), "txt_emb": torch.cat(txt_emb)}


def _scenes_eval(args, parts, memory, source, val_idx, data, grounding, trainer):
    def evaluate():
        fusion = parts.fusion
        rec = eval_edje(parts.adapter, parts.joint, memory["patch"], source.ids, source.mask, val_idx, data["groups"],
                        args.device, data["variants"],
                        None if fusion is None else (memory["img_emb"], memory["txt_emb"], fusion.weight.item()))
        if fusion is not None:
            rec["fusion_weight"] = round(fusion.weight.item(), 4)
        if grounding is not None:
            rec["val_grounding"] = eval_grounding(parts.mlm, parts.adapter, parts.joint, memory["patch"], grounding)
            if args.mlm_only_steps and trainer.step == args.mlm_only_steps:
                warn_if_ungrounded(rec["val_grounding"], trainer.step)
        warm = trainer.step <= args.mlm_only_steps  # (the head is untrained during the MLM warm-up)
        if rec["val_score_spread"] < 1e-3 and not warm:
            log.warning("step %d: scores barely differ between pairs (spread %.1e): the scorer has not "
                        "started or has collapsed to a constant (docs/experiments.md, run sets R3 and R4)",
                        trainer.step, rec["val_score_spread"])
        return rec["val_group_acc_fused" if fusion is not None else "val_group_acc"], rec
    return evaluate


def _stream_eval(args, parts, backbone, held_out):
    def evaluate():
        if held_out is None:
            return None, {}
        w = parts.fusion.weight.item() if parts.fusion is not None else 0.0
        rec = {"val": held_out.evaluate(backbone, parts.adapter, parts.joint, parts.tokenizer, w, args.device)}
        if parts.fusion is not None:
            rec["fusion_weight"] = round(w, 4)
        return rec["val"]["t2i"]["reranked"]["R@1"], rec
    return evaluate


def _write_checkpoint(args, backbone, parts, out: Path, world: World) -> Path:
    """The best evaluation's weights (else the last), as a normal checkpoint (rank 0 writes it)."""
    final = Path(args.output) / "checkpoint"
    load_best(out, parts.modules, [k for k in ("adapter", "joint", "fusion") if k in parts.modules])
    joint_cfg = parts.joint_cfg
    if parts.fusion is not None:
        joint_cfg = dataclasses.replace(joint_cfg, fusion_weight=round(parts.fusion.weight.item(), 6))
    cfg = CheckpointConfig(backbone.cfg, parts.adapter_cfg, joint_cfg, description=args.description)
    frozen = {k for k, p in parts.joint.named_parameters() if not p.requires_grad}
    joint_state = {k: v for k, v in parts.joint.state_dict().items()  # MiniLM's own frozen weights load from the package
                   if args.joint_width or k not in frozen}
    if world.main:
        fp = save_checkpoint(final, cfg, {"backbone": backbone, "adapter": parts.adapter, "joint": joint_state},
                             dtype=torch.float16)
        log.info("wrote %s (fingerprint %s)", final, fp)
    return final
