"""Train: the demo's backbone (stage ``clip``) and EDJE's adapter + joint encoder (stage ``edje``).

    python -m pipeline.train --stage all --data 'scenes/train/*.tar' --output runs/demo --device cuda

Stage ``clip``: a small open_clip model trained contrastively on the scenes (the first-stage
retriever and frozen backbone of the demo), until validation T2I R@1 stops improving.
Stage ``edje``: backbone frozen; its patch tokens are computed once for all training images;
adapter + joint encoder (MiniLM, first ``--joint_layers`` layers, or with ``--joint_width`` a
narrower BERT whose embeddings are projected from MiniLM's; word embeddings frozen) are trained
with EDJE's listwise ITM objective in both directions: for each caption, its image against the
hardest in-batch images (mined with the frozen backbone's own embeddings, masking the same image
and identical captions) plus one random image; likewise for each image over captions; each
scored pair serves both directions. Batches are built from whole scene groups, so a scene's
colour- and relation-swapped siblings are in the batch, and they are taken first among the hard
negatives (``--sibling_negatives``): the frozen backbone that mines the rest may already tell
them apart and so never pick them. Optional: MLM on the captions (``--mlm_weight``, whole words by
``--mlm_words``; ``--mlm_only_steps`` of it before ITM) with a grounding report per word class, and
``--fusion``: pairs ranked by logit + w * first-stage cosine in the loss, w stored in the checkpoint.
Writes ``OUTPUT/checkpoint`` (config.json + model.safetensors); seeded; resumable from
``OUTPUT/<stage>/state.pt`` (tensors only, loaded with weights_only=True).
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.adapter import AdapterConfig, TokenCompressionAdapter
from models.backbone import Backbone, BackboneConfig
from models.checkpoint import CheckpointConfig, save_checkpoint
from models.joint_encoder import (MINILM_PACKAGE, JointEncoder, JointEncoderConfig, Tokenizer, build_bert,
                                  resolve_base_model)
from models.losses import MaskedLMHead, clip_loss, hardest_negatives, listwise_itm_loss, random_negatives
from models.mlm import RULES as MLM_RULES
from models.mlm import Mlm, caption_words, grounding_report
from pipeline._cli import add_filesystem_flags, apply_filesystem_flags, finish
from schemas import storage
from transforms.image_decode import decode_image
from transforms.shard_files import plan_shards
from transforms.tar_samples import iter_samples

log = logging.getLogger("train")

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


def training_shards(pattern: str):
    """The shards a --data pattern names (braces, globs, commas; local or object-store), sorted."""
    return sorted({spec.source for spec in plan_shards(pattern).shards})


def load_scenes(pattern: str, transform, limit: int = 0):
    """Scene shards -> dict(keys, captions, groups, images (N, 3, H, W) float32, relevant)."""
    keys, captions, groups, images, variants = [], [], [], [], []
    paths = training_shards(pattern)
    for path in paths:
        with storage.open_read(path) as f:
            for s in iter_samples(f):
                ext = s.image_extension()
                if ext is None or "txt" not in s.members:
                    continue
                meta = json.loads(s.members["json"]) if "json" in s.members else {}
                variants.append(int(meta.get("variant", -1)))
                keys.append(s.key)
                captions.append(s.members["txt"].decode("utf-8").strip())
                groups.append(int(meta.get("group", len(groups))))
                images.append(transform(decode_image(s.members[ext])))
                if limit and len(keys) >= limit:
                    break
        if limit and len(keys) >= limit:
            break
    if not keys:
        raise SystemExit(f"error: no training samples in {pattern}")
    # Relevant sets from the split's queries.jsonl (a scene drawn twice answers both captions).
    position = {k: i for i, k in enumerate(keys)}
    relevant = [[i] for i in range(len(keys))]
    queries = storage.join(posixpath.dirname(paths[0]), "queries.jsonl")
    if storage.exists(queries):
        with storage.open_read(queries) as f:
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                q = json.loads(line)
                if q["query_id"] in position:
                    relevant[position[q["query_id"]]] = [position[r] for r in q.get("relevant", []) if r in position]
    return {"keys": keys, "captions": captions, "groups": np.array(groups), "images": torch.stack(images),
            "relevant": relevant, "caption_ids": torch.as_tensor(np.unique(captions, return_inverse=True)[1]),
            "variants": np.array(variants)}


def split_validation(groups: np.ndarray, fraction: float):
    """Whole groups go to validation by a stable hash of the group id."""
    val_groups = {g for g in set(groups.tolist())
                  if int(hashlib.sha256(str(g).encode()).hexdigest(), 16) % 1000 < fraction * 1000}
    val = np.array([g in val_groups for g in groups])
    return np.flatnonzero(~val), np.flatnonzero(val)


def group_members(indices: np.ndarray, groups: np.ndarray):
    """The indices of each group present, as lists in order of group id."""
    by_group = {}
    for i in indices:
        by_group.setdefault(groups[i], []).append(i)
    return [by_group[g] for g in sorted(by_group)]


def group_batches(indices: np.ndarray, groups: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Endless batches of whole groups (a scene and its hard variants train together)."""
    members = group_members(indices, groups)
    order = np.arange(len(members))
    batch_size = min(batch_size, len(indices))  # a split smaller than one batch would never fill it
    while True:
        rng.shuffle(order)
        batch = []
        for g in order:
            batch.extend(members[g])
            if len(batch) >= batch_size:
                yield np.array(batch[:batch_size])
                batch = []


def neighbour_batches(indices: np.ndarray, groups: np.ndarray, embeddings: torch.Tensor, batch_size: int,
                      rng: np.random.Generator, share: float = 1.0, neighbours: int = 32):
    """Endless batches of whole groups, ``share`` of each batch close together under the frozen
    backbone: a batch starts at a random group not yet used this epoch and adds that group's
    nearest unused groups (by the cosine of their mean image embeddings), then random unused ones.
    A reranker's candidates are the first stage's nearest images, so its in-batch negatives should
    include near ones, not only a scene's own variants."""
    members = group_members(indices, groups)
    centre = F.normalize(torch.stack([embeddings[m].float().mean(0) for m in members]), dim=-1)
    k = min(neighbours, len(members) - 1)
    # each group's k nearest others (the first hit is the group itself), in blocks of rows
    near = torch.cat([(block @ centre.t()).topk(k + 1, dim=1).indices[:, 1:]
                      for block in centre.split(1024)]).cpu().numpy()
    batch_size = min(batch_size, len(indices))
    while True:
        used = np.zeros(len(members), dtype=bool)
        order = rng.permutation(len(members))
        fill = iter(order)
        for seed in order:
            if used[seed]:
                continue
            batch, used[seed] = list(members[seed]), True
            for g in near[seed]:
                if len(batch) >= share * batch_size:
                    break
                if not used[g]:
                    batch.extend(members[g])
                    used[g] = True
            # the rest: unused groups in this epoch's random order
            while len(batch) < batch_size and (g := next(fill, None)) is not None:
                if not used[g]:
                    batch.extend(members[g])
                    used[g] = True
            if len(batch) >= batch_size:
                yield np.array(batch[:batch_size])


def identical(caption_ids: torch.Tensor, idx) -> torch.Tensor:
    """(B, B) True where two batch items have the same caption text (ids from np.unique)."""
    c = caption_ids[torch.as_tensor(idx, device=caption_ids.device)]
    return c[:, None] == c[None, :]


def cosine_schedule(step, total, warmup, time_fraction=0.0, work=None):
    """Linear warm-up, then cosine decay to 0 by ``total`` steps. ``work(step)``, when given, is
    the work done by then (steps weighted by cost), and the decay follows it instead of the step
    count. ``time_fraction`` (the share of a time budget spent) takes over when it runs ahead, so
    a time-boxed run still ends at a low learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    work = work or (lambda s: s)
    progress = (work(step) - work(warmup)) / max(1e-9, work(total) - work(warmup))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(progress, time_fraction))))


class Trainer:
    """Shared loop: seeded, resumable, time-boxed, early stopping on a validation metric."""

    def __init__(self, args, stage_dir: Path, params, lr, max_steps: int, work=None):
        self.args, self.dir, self.max_steps, self.work = args, stage_dir, max_steps, work
        self.dir.mkdir(parents=True, exist_ok=True)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
        self.step, self.best, self.bad_evals, self.history = 0, -1.0, 0, []

    def state_path(self):
        return self.dir / "state.pt"

    def save(self, modules):
        state = {"step": torch.tensor(self.step), "best": torch.tensor(self.best),
                 "bad_evals": torch.tensor(self.bad_evals), "optimizer": self.opt.state_dict(),
                 **{f"module.{k}": m.state_dict() for k, m in modules.items()}}
        tmp = self.state_path().with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path())
        (self.dir / "history.json").write_text(json.dumps(self.history, indent=1))

    def resume(self, modules) -> bool:
        if not self.state_path().exists():
            return False
        state = torch.load(self.state_path(), map_location="cpu", weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[f"module.{k}"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.best = int(state["step"]), float(state["best"])
        self.bad_evals = int(state["bad_evals"])
        if (self.dir / "history.json").exists():
            self.history = json.loads((self.dir / "history.json").read_text())
        log.info("resumed %s at step %d", self.dir, self.step)
        return True

    def start_clock(self, minutes: float, steps_given: bool):
        """``steps_given``: the stage has its own step budget, and the schedule follows steps alone
        (the time limit then only stops it), so the rates never depend on the machine's speed.
        Otherwise the stage is time-boxed and the schedule also follows the share of time spent."""
        self.started, self.budget, self.timed = time.time(), minutes * 60, not steps_given

    def out_of_time(self) -> bool:
        return time.time() - self.started >= self.budget

    def set_lr(self, base_lrs):
        time_fraction = (time.time() - self.started) / self.budget if self.timed else 0.0
        f = cosine_schedule(self.step, self.max_steps, self.args.warmup, time_fraction, self.work)
        for group, base in zip(self.opt.param_groups, base_lrs):
            group["lr"] = base * f

    def finish(self, best_name: str):
        stopped = "steps" if self.step >= self.max_steps else "time" if self.out_of_time() else "plateau"
        if stopped == "time" and not self.timed:
            log.warning("%s stopped by its time limit at step %d of %d: its schedule did not finish, and the "
                        "run is not the seeded one (raise --max_minutes_* or lower the step budget)",
                        self.dir.name, self.step, self.max_steps)
        (self.dir / "done.json").write_text(json.dumps({
            "step": self.step, "max_steps": self.max_steps, "stopped": stopped, best_name: self.best,
            "seconds": round(time.time() - self.started, 1)}))

    def after_eval(self, metric, record, modules, counts: bool = True) -> bool:
        """Logs, checkpoints the best, returns True to stop (plateau). ``counts`` False: a warm-up
        evaluation, recorded only (its metric is not the one being trained yet)."""
        record.update(step=self.step, metric=metric, seconds=round(time.time() - self.started, 1))
        self.history.append(record)
        tqdm.write(json.dumps(record))
        if counts and metric > self.best + 1e-4:
            self.best, self.bad_evals = metric, 0
            torch.save({k: m.state_dict() for k, m in modules.items()}, self.dir / "best.pt")
        elif counts:
            self.bad_evals += 1
        self.save(modules)
        return self.bad_evals >= self.args.patience


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------- stage clip
def train_clip(args, data, train_idx, val_idx) -> Path:
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
    trainer.start_clock(args.max_minutes_clip, bool(args.max_steps_clip))
    bar = tqdm(total=trainer.max_steps, initial=trainer.step, desc="clip", dynamic_ncols=True)
    while trainer.step < trainer.max_steps:
        idx = next(batches)
        backbone.train()
        trainer.set_lr([args.lr_clip])
        with autocast(args.device):
            img = backbone(images[idx])[0]
            txt = F.normalize(backbone.clip.encode_text(texts[idx]).float(), dim=-1)
            loss = clip_loss(img, txt, backbone.clip.logit_scale, identical(caption_ids, idx))
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        trainer.opt.step()
        trainer.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        out_of_time = trainer.out_of_time()
        if trainer.step % args.eval_every == 0 or trainer.step == trainer.max_steps or out_of_time:
            rec = eval_clip(backbone, images, texts, val_idx, data["groups"], args.device)
            rec["loss"] = round(loss.item(), 4)
            if trainer.after_eval(rec["val_t2i_r1"], rec, modules) or out_of_time:
                break
    bar.close()
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True) if (out / "best.pt").exists() else None
    if best:
        backbone.load_state_dict(best["backbone"])
    save_checkpoint(out / "backbone", CheckpointConfig(backbone.cfg, AdapterConfig(input_dim=backbone.width, num_heads=1)),
                    {"backbone": backbone, "adapter": TokenCompressionAdapter(AdapterConfig(input_dim=backbone.width, num_heads=1))})
    trainer.finish("best_val_t2i_r1")
    return out


@torch.no_grad()
def eval_clip(backbone, images, texts, val_idx, groups, device):
    backbone.eval()
    with autocast(device):
        img = torch.cat([backbone(images[val_idx[i:i + 512]])[0] for i in range(0, len(val_idx), 512)])
        txt = torch.cat([F.normalize(backbone.clip.encode_text(texts[val_idx[i:i + 512]]).float(), dim=-1)
                         for i in range(0, len(val_idx), 512)])
    sim = txt @ img.t()
    r1 = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().item()
    return {"val_t2i_r1": round(100 * r1, 2), "val_group_acc": round(100 * group_accuracy(sim, groups[val_idx]), 2)}


def group_accuracy(sim: torch.Tensor, groups: np.ndarray) -> float:
    """Caption -> its own image among its group's images (chance: 1 / group size)."""
    g = torch.as_tensor(groups, device=sim.device)
    same = g[:, None] == g[None, :]
    masked = sim.masked_fill(~same, float("-inf"))
    return (masked.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().item()


# ---------------------------------------------------------------- stage edje
def train_edje(args, data, train_idx, val_idx, backbone_dir: Path) -> Path:
    from models.checkpoint import load_vision_encoder
    out = Path(args.output) / "edje"
    torch.manual_seed(args.seed + 1)
    encoder, _, _ = load_vision_encoder(backbone_dir, args.device)
    backbone = encoder.backbone
    tok_clip = backbone.tokenizer()
    with torch.no_grad(), autocast(args.device):
        patch, img_emb, txt_emb = [], [], []
        for i in range(0, len(data["keys"]), 512):
            e, p = backbone(data["images"][i:i + 512].to(args.device))
            patch.append(p.float())
            img_emb.append(e.float())
            txt_emb.append(backbone.encode_text(tok_clip(data["captions"][i:i + 512]).to(args.device)).float())
    patch, img_emb, txt_emb = torch.cat(patch), torch.cat(img_emb), torch.cat(txt_emb)
    adapter_cfg = AdapterConfig(num_tokens=args.num_tokens, input_dim=backbone.width, output_dim=args.joint_width or 384,
                                num_heads=max(1, backbone.width // 32), mlp_dim=4 * backbone.width,
                                grid=backbone.clip.visual.grid_size[0]
                                if args.adapter_positions or args.adapter_locality or args.adapter_cells else 0,
                                locality=args.adapter_locality, cells=args.adapter_cells,
                                output_positions=args.adapter_output_positions, output_norm=args.adapter_output_norm)
    joint_cfg = joint_encoder_config(args)
    adapter = TokenCompressionAdapter(adapter_cfg).to(args.device)
    joint = JointEncoder(joint_cfg)
    if args.joint_width:
        init_from_minilm(joint.bert)
    joint = joint.to(args.device)
    joint.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # MiniLM's, or their projection
    frozen_layers = frozen_text_layers(args)
    if frozen_layers:
        # MiniLM's own first steps of parsing the caption: no backward through them, and they load
        # from the package (not stored)
        for module in (joint.bert.embeddings, *joint.bert.encoder.layer[:frozen_layers]):
            module.requires_grad_(False)
    tokenizer = Tokenizer(joint_cfg)
    if args.adapter_position_words:
        init_position_words(adapter, tokenizer, joint.bert.embeddings.word_embeddings.weight)
    if args.mlm_words in CLASS_RULES:  # the scenes' word classes: each caption masks all words of one class
        ids, mask, words = scene_word_classes(tokenizer, data["captions"], args.device)
    else:
        ids, mask, words, _ = caption_words(tokenizer, data["captions"], args.mlm_words)
    ids, mask, words = ids.to(args.device), mask.to(args.device), words.to(args.device)
    caption_ids = data["caption_ids"].to(args.device)
    group_ids = torch.as_tensor(data["groups"], device=args.device)
    params = [{"params": adapter.parameters(), "lr": args.lr_adapter},
              {"params": [p for p in joint.bert.parameters() if p.requires_grad], "lr": args.lr_joint},
              {"params": joint.head.parameters(), "lr": args.lr_adapter}]
    base_lrs = [args.lr_adapter, args.lr_joint, args.lr_adapter]
    modules = {"adapter": adapter, "joint": joint}
    mlm = grounding = None
    if args.mlm_weight or args.mlm_only_steps:
        mlm = Mlm(MaskedLMHead(joint.bert.embeddings.word_embeddings, joint.bert.config.layer_norm_eps).to(args.device),
                  tokenizer.tok.mask_token_id, args.mlm_weight, args.mlm_probability,
                  args.mlm_words in CLASS_RULES, OBJECT_CLASSES if args.mlm_words == "objects" else ())
        params.append({"params": mlm.head.parameters(), "lr": args.lr_adapter})
        base_lrs.append(args.lr_adapter)
        modules["mlm"] = mlm.head
        grounding = scene_word_classes(tokenizer, [data["captions"][i] for i in val_idx[:GROUNDING_ROWS]], args.device)
    fusion = None
    if args.fusion:
        # starts as the first stage's own softmax temperature: at first the pair ranks as the first stage ranks it
        fusion = Fusion(float(backbone.clip.logit_scale.exp().clamp(max=100))).to(args.device)
        params.append({"params": fusion.parameters(), "lr": args.lr_adapter})
        base_lrs.append(args.lr_adapter)
        modules["fusion"] = fusion
    # An MLM-only step costs ~0.45 of an ITM step on a CPU; counting it so (--mlm_step_cost) starts
    # a step-budget ITM phase at the rate a time-boxed schedule gave it (BENCHMARKS.md, "Issue 12,
    # session 8": whether ITM takes off was decided by the backbone's MLM grounding, not this rate).
    m, cost = args.mlm_only_steps, args.mlm_step_cost
    trainer = Trainer(args, out, params, args.lr_joint, args.max_steps_edje or args.max_steps,
                      work=lambda s: cost * min(s, m) + max(0, s - m))
    cfg = CheckpointConfig(backbone.cfg, adapter_cfg, joint_cfg, description=args.description)
    if not (out / "done.json").exists():
        trainer.resume(modules)
        rng = np.random.default_rng([args.seed, 1, trainer.step])
        gen = torch.Generator(device=args.device).manual_seed(args.seed + trainer.step)
        batches = group_batches(train_idx, data["groups"], args.batch_size_edje, rng)
        # Near-neighbour batches from the start leave no easy pair to learn from (measured: the scorer
        # collapses to a constant), so they follow the random-negative steps, like the hard negatives.
        near = (neighbour_batches(train_idx, data["groups"], img_emb, args.batch_size_edje, rng, args.neighbour_share)
                if args.edje_batching == "neighbours" else batches)
        trainer.start_clock(args.max_minutes_edje, bool(args.max_steps_edje))
        bar = tqdm(total=trainer.max_steps, initial=trainer.step, desc="edje", dynamic_ncols=True)
        while trainer.step < trainer.max_steps:
            warm = trainer.step < args.mlm_only_steps
            easy = trainer.step < args.mlm_only_steps + args.random_only_steps
            idx = torch.as_tensor(next(batches if easy else near), device=args.device)
            adapter.train(), joint.train()
            trainer.set_lr(base_lrs)
            hard = 0 if easy else args.hard_negatives
            siblings = same_group(group_ids, idx) if args.sibling_negatives else None
            if warm:
                loss, acc = mlm_step(adapter, joint, patch, ids, mask, words, idx, mlm, gen, args.device), float("nan")
            else:
                loss, acc = edje_step(adapter, joint, patch, img_emb, txt_emb, ids, mask, idx,
                                      identical(caption_ids, idx), hard, gen, args.device, siblings,
                                      mlm if args.mlm_weight else None, words,
                                      None if fusion is None else fusion.weight)
            trainer.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
            trainer.opt.step()
            trainer.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            out_of_time = trainer.out_of_time()
            every = args.eval_every_edje or args.eval_every
            mlm_done = bool(args.mlm_only_steps) and trainer.step == args.mlm_only_steps
            if trainer.step % every == 0 or trainer.step == trainer.max_steps or out_of_time or mlm_done:
                rec = eval_edje(adapter, joint, patch, ids, mask, val_idx, data["groups"], args.device,
                                data["variants"],
                                None if fusion is None else (img_emb, txt_emb, fusion.weight.item()))
                rec["loss"] = round(loss.item(), 4)
                if fusion is not None:
                    rec["fusion_weight"] = round(fusion.weight.item(), 4)
                if grounding is not None:
                    rec["val_grounding"] = eval_grounding(mlm, adapter, joint, patch, ids, mask, val_idx, grounding)
                    if mlm_done:
                        warn_if_ungrounded(rec["val_grounding"], trainer.step)
                if rec["val_score_spread"] < 1e-3 and not warm:  # (the head is untrained during MLM warm-up)
                    log.warning("step %d: scores barely differ between pairs (spread %.1e): the scorer has not "
                                "started or has collapsed to a constant (BENCHMARKS.md, 'on the CPU')",
                                trainer.step, rec["val_score_spread"])
                metric = rec["val_group_acc_fused" if fusion is not None else "val_group_acc"]
                if trainer.after_eval(metric, rec, modules, counts=not warm) or out_of_time:
                    break
        bar.close()
        trainer.finish("best_val_group_acc")
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True) if (out / "best.pt").exists() else None
    if best:  # (the MLM head is training-only)
        adapter.load_state_dict(best["adapter"])
        joint.load_state_dict(best["joint"])
        if fusion is not None:
            fusion.load_state_dict(best["fusion"])
    if fusion is not None:
        joint_cfg = dataclasses.replace(joint_cfg, fusion_weight=round(fusion.weight.item(), 6))
        cfg = CheckpointConfig(backbone.cfg, adapter_cfg, joint_cfg, description=args.description)
    frozen = {k for k, p in joint.named_parameters() if not p.requires_grad}
    joint_state = {k: v for k, v in joint.state_dict().items()  # MiniLM's own frozen weights load from the package
                   if args.joint_width or k not in frozen}
    final = Path(args.output) / "checkpoint"
    fp = save_checkpoint(final, cfg, {"backbone": backbone, "adapter": adapter, "joint": joint_state},
                         dtype=torch.float16)
    log.info("wrote %s (fingerprint %s)", final, fp)
    return final


def frozen_text_layers(args) -> int:
    """How many of the lowest text-only layers stay MiniLM's (a narrow encoder has none of MiniLM's)."""
    if args.joint_width:
        return 0
    return args.text_layers if args.frozen_text_layers is None else args.frozen_text_layers


def joint_encoder_config(args) -> JointEncoderConfig:
    """The first ``--joint_layers`` MiniLM layers, or (``--joint_width``) a narrower BERT of that many
    layers with MiniLM's vocabulary, initialised by ``init_from_minilm``."""
    common = dict(max_text_tokens=args.max_text_tokens, image_positions=args.image_positions,
                  text_layers=args.text_layers)
    if not args.joint_width:
        return JointEncoderConfig(base_model=MINILM_PACKAGE, bert_overrides={"num_hidden_layers": args.joint_layers},
                                  **common)
    from transformers import BertConfig
    base = BertConfig.from_pretrained(str(resolve_base_model(MINILM_PACKAGE)))
    w = args.joint_width
    bert = {"vocab_size": base.vocab_size, "hidden_size": w, "num_hidden_layers": args.joint_layers,
            "num_attention_heads": max(1, w // 32), "intermediate_size": 4 * w,
            "max_position_embeddings": base.max_position_embeddings, "type_vocab_size": base.type_vocab_size,
            "pad_token_id": base.pad_token_id, "layer_norm_eps": base.layer_norm_eps}
    return JointEncoderConfig(base_model=None, tokenizer=MINILM_PACKAGE, bert_overrides=bert, **common)


@torch.no_grad()
def init_from_minilm(bert) -> None:
    """A narrow BERT's word and position embeddings from MiniLM's, projected on the top principal
    directions of MiniLM's word embeddings (words keep their neighbours) and rescaled to BERT's
    initial spread; the layers stay randomly initialised."""
    minilm = build_bert(JointEncoderConfig(bert_overrides={"num_hidden_layers": 1}), load_base_weights=True)
    word = minilm.embeddings.word_embeddings.weight.double()
    position = minilm.embeddings.position_embeddings.weight.double()
    w = bert.config.hidden_size
    mean = word.mean(0)
    basis = torch.linalg.svd(word - mean, full_matrices=False).Vh[:w].t()  # (384, w)
    projected = (word - mean) @ basis
    scale = bert.config.initializer_range / projected.std()
    bert.embeddings.word_embeddings.weight.copy_(projected * scale)
    bert.embeddings.position_embeddings.weight.copy_(((position - position.mean(0)) @ basis) * scale)


POSITION_WORDS = {"columns": (("left",), ("right",)), "rows": (("above", "top"), ("below", "bottom"))}


@torch.no_grad()
def init_position_words(adapter, tokenizer, word_embeddings: torch.Tensor, scale: float = 0.5) -> None:
    """Starts the adapter's row and column embeddings at the joint encoder's own (centred) word
    embeddings of where they are: the left half of the columns "left", the right half "right", the
    upper rows "above"/"top", the lower rows "below"/"bottom" (a middle row or column: the mean);
    times ``scale``. A token then says "red circle, left" in words the language model already reads,
    so a caption's spatial word binds to an object as a colour binds to a shape. Trained from there."""
    centre = word_embeddings.mean(0)

    def meaning(words):
        ids = [i for w in words for i in tokenizer.tok(w, add_special_tokens=False)["input_ids"]]
        return (word_embeddings[ids] - centre).mean(0)
    side = adapter.rows.shape[0]
    for name, (first, second) in POSITION_WORDS.items():
        a, b = meaning(first), meaning(second)
        table = getattr(adapter, name)
        for k in range(side):
            t = (k + 0.5) / side
            share = 1.0 if t < 0.5 else 0.0 if t > 0.5 else 0.5
            table[k] = scale * (share * a + (1 - share) * b).to(table.dtype)


class Fusion(torch.nn.Module):
    """The weight w of ``logit + w * first-stage cosine``, learnt with the listwise loss; it lands in
    the checkpoint's config (``joint_encoder.fusion_weight``) and rerank ranks by that sum."""

    def __init__(self, init: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(init))


GROUNDING_ROWS = 512  # validation captions in each grounding evaluation
WORD_CLASSES = {0: "colour", 1: "shape", 2: "size", 3: "spatial"}
# every word naming an object, masked at once: only the relation words are left to say which
# object is which, so filling them in needs the objects' places (``--mlm_words objects``)
OBJECT_CLASSES = (0, 1, 2)
CLASS_RULES = ("classes", "objects")  # --mlm_words rules that mask by the scenes' word classes
# Object words' own-image MLM accuracy when ITM started: 77-89% in every CPU run whose ITM took off,
# 63-65% in those that stayed at chance (BENCHMARKS.md, "Issue 12, sessions 8 and 9").
GROUNDED_OBJECTS = 75.0


def warn_if_ungrounded(report: dict, step: int) -> bool:
    """Warn when the MLM-only steps end with the object words still poorly read from the image."""
    own = report.get("objects", {}).get("own")
    if own is None or own >= GROUNDED_OBJECTS:
        return False
    log.warning("step %d, end of the MLM-only steps: object words are filled in at %.1f%% from the caption's own "
                "image; ITM has taken off only from ~%.0f%% in measured runs (BENCHMARKS.md, 'Issue 12, sessions 8 and 9'): "
                "more --mlm_only_steps may be needed", step, own, GROUNDED_OBJECTS)
    return True


def scene_word_classes(tokenizer, captions, device):
    """(ids, mask, word class per token (-1: none)) of the scenes' captions, for grounding reports."""
    from models.mlm import SPATIAL_WORDS
    from pipeline.make_scenes import COLORS, SHAPES, SIZES
    vocab = {**{w: 0 for w in COLORS}, **{w: 1 for w in SHAPES}, **{w: 2 for w in SIZES},
             **{w: 3 for w in SPATIAL_WORDS}}
    ids, mask, words, strings = caption_words(tokenizer, captions, "all")
    cls = torch.full(ids.shape, -1, dtype=torch.long)
    for r, row in enumerate(strings):
        table = torch.tensor([vocab.get(w, -1) for w in row] + [-1], dtype=torch.long)
        cls[r] = table[words[r]]  # word -1 (special, padding) reads the trailing -1
    return ids.to(device), mask.to(device), cls.to(device)


@torch.no_grad()
def eval_grounding(mlm, adapter, joint, patch, ids, mask, val_idx, grounding):
    """Masked-word accuracy per word class on the first validation captions: own image, another
    scene's image (the next group's), no image."""
    adapter.eval(), joint.eval()
    g_ids, g_mask, g_cls = grounding
    rows = torch.as_tensor(val_idx[:len(g_ids)], device=patch.device)
    tokens = adapter(patch[rows])
    return grounding_report(mlm, joint, g_ids, g_mask, g_cls, tokens, tokens.roll(4, 0), WORD_CLASSES,
                            unions={"objects": OBJECT_CLASSES})


def same_group(group_ids: torch.Tensor, idx) -> torch.Tensor:
    """(B, B) True where two batch items are variants of the same scene group."""
    g = group_ids[torch.as_tensor(idx, device=group_ids.device)]
    return g[:, None] == g[None, :]


def edje_step(adapter, joint, patch, img_emb, txt_emb, ids, mask, idx, same_caption, hard, gen, device,
              siblings=None, mlm=None, words=None, fusion=None):
    """One listwise ITM loss over a batch, both directions. Returns (loss, t2i accuracy).

    The pairs scored are the positives, each caption's ``hard`` hardest images and each image's
    hardest captions (``siblings`` (B, B) bool: a scene's minimal variants, taken first), and one
    random negative per caption and per image. Each pair is scored once and serves both
    directions: caption i's softmax runs over every scored pair in row i of the (captions x
    images) matrix, image j's over column j. With whole scene groups in the batch, a group's
    16 caption-image pairs cover both directions' sibling negatives. ``mlm``: an ``Mlm`` whose
    weighted loss on the batch's positives is added (``words``: its maskable-word table).
    ``fusion``: a weight w; each pair is then ranked by logit + w * the frozen backbone's cosine,
    so the joint encoder learns what the first stage gets wrong."""
    b = len(idx)
    rows = torch.arange(b, device=device)
    not_neg = same_caption | torch.eye(b, dtype=torch.bool, device=device)
    sim = txt_emb[idx] @ img_emb[idx].t()  # captions x images, from the frozen backbone
    scored = torch.eye(b, dtype=torch.bool, device=device)
    if hard:
        scored[rows[:, None], hardest_negatives(sim, hard, not_neg, siblings)] = True
        scored[hardest_negatives(sim.t(), hard, not_neg.t(), None if siblings is None else siblings.t()),
               rows[:, None]] = True
    scored[rows, random_negatives(not_neg, gen)] = True
    scored[random_negatives(not_neg.t(), gen), rows] = True
    cap, img = scored.nonzero(as_tuple=True)
    batch_ids, batch_mask = ids[idx], mask[idx]
    width = int(batch_mask.sum(1).max())  # drop the padding no caption of this batch needs
    with autocast(device):
        tokens = adapter(patch[idx])
        logits = joint(batch_ids[:, :width], batch_mask[:, :width], tokens[img], text_index=cap).float()
        if fusion is not None:
            logits = logits + fusion * sim[cap, img]
        loss = listwise_itm_loss(logits, cap, img, b)
        if mlm is not None:
            loss = loss + mlm.weight * mlm.loss(joint, batch_ids[:, :width], batch_mask[:, :width],
                                                words[idx][:, :width], tokens, gen)
    t2i = torch.full((b, b), float("-inf"), device=device).index_put((cap, img), logits.detach())
    return loss, (t2i.argmax(1) == rows).float().mean().item()


def mlm_step(adapter, joint, patch, ids, mask, words, idx, mlm, gen, device):
    """The MLM objective alone on a batch of positives (a cheap grounding warm-up before ITM)."""
    width = int(mask[idx].sum(1).max())
    with autocast(device):
        return mlm.loss(joint, ids[idx, :width], mask[idx, :width], words[idx, :width], adapter(patch[idx]), gen)


@torch.no_grad()
def eval_edje(adapter, joint, patch, ids, mask, val_idx, groups, device, variants=None, first_stage=None):
    """Caption -> own image among its group (and image -> own caption): the hard-pair accuracy,
    also per variant (which minimal change the encoder misses). ``first_stage``: (image embeddings,
    text embeddings, w): the same for logit + w * cosine (``*_fused``)."""
    adapter.eval(), joint.eval()
    g = groups[val_idx]
    per_variant = {}
    by_group = {}
    for pos, gid in enumerate(g):
        by_group.setdefault(gid, []).append(pos)
    correct_t2i = correct_i2t = total = fused_hits = 0
    fused_variant = {}
    spreads = []
    vidx = torch.as_tensor(val_idx, device=device)
    with autocast(device):
        tokens = torch.cat([adapter(patch[vidx[i:i + 512]]) for i in range(0, len(vidx), 512)]).float()
    for members in by_group.values():
        n = len(members)
        m = torch.as_tensor(members, device=device)
        cap = m.repeat_interleave(n)
        img = m.repeat(n)
        with autocast(device):
            s = joint(ids[vidx[m]], mask[vidx[m]], tokens[img],
                      text_index=torch.arange(n, device=device).repeat_interleave(n)).float().reshape(n, n)
        target = torch.arange(n, device=device)
        spreads.append(s.std().item() if n > 1 else 0.0)
        hits = (s.argmax(1) == target).tolist()
        correct_t2i += sum(hits)
        correct_i2t += (s.argmax(0) == target).sum().item()
        total += n
        if first_stage is not None:
            img_emb, txt_emb, w = first_stage
            cos = (txt_emb[vidx[cap]] * img_emb[vidx[img]]).sum(-1).reshape(n, n)
            fused = ((s + w * cos).argmax(1) == target).tolist()
            fused_hits += sum(fused)
        if variants is not None:
            for k, (pos, hit) in enumerate(zip(members, hits)):
                v = int(variants[val_idx[pos]])
                per_variant.setdefault(v, []).append(hit)
                if first_stage is not None:
                    fused_variant.setdefault(v, []).append(fused[k])
    # The scores' spread within a group: near 0 means a collapsed scorer (the same score for every pair).
    out = {"val_group_acc": round(100 * correct_t2i / total, 2), "val_group_acc_i2t": round(100 * correct_i2t / total, 2),
           "val_score_spread": round(float(np.mean(spreads)), 5)}
    if per_variant:
        out["val_variant_acc"] = {f"v{v}": round(100 * sum(h) / len(h), 2) for v, h in sorted(per_variant.items())}
    if first_stage is not None:
        out["val_group_acc_fused"] = round(100 * fused_hits / total, 2)
        if fused_variant:
            out["val_variant_acc_fused"] = {f"v{v}": round(100 * sum(h) / len(h), 2)
                                            for v, h in sorted(fused_variant.items())}
    return out


@torch.no_grad()
def test_rerank_gain(checkpoint: Path, pattern: str, device: str, top_k: int = 20, limit: int = 0) -> dict:
    """Quick check on a test split without Beam: T2I R@1/5 of the first stage (backbone cosine over
    the whole split) vs the joint encoder reranking its top-k (fp32 tokens), alone and fused with
    the first stage by the checkpoint's fusion weight (``fused_*``, when it has one)."""
    from models.checkpoint import load_joint_encoder, load_vision_encoder
    encoder, _, _ = load_vision_encoder(checkpoint, device)
    joint, tokenizer, cfg, _ = load_joint_encoder(checkpoint, device)
    data = load_scenes(pattern, encoder.backbone.image_transform(), limit)
    tok_clip = encoder.backbone.tokenizer()
    toks, img, txt = [], [], []
    with autocast(device):
        for i in range(0, len(data["keys"]), 512):
            t, e = encoder(data["images"][i:i + 512].to(device))
            toks.append(t.float()), img.append(e.float())
            txt.append(encoder.backbone.encode_text(tok_clip(data["captions"][i:i + 512]).to(device)).float())
    toks, img, txt = torch.cat(toks), torch.cat(img), torch.cat(txt)
    sim = txt @ img.t()
    top_k = min(top_k, len(sim))
    cand = sim.topk(top_k, dim=1).indices  # (N, k)
    n = len(sim)
    ids, mask = tokenizer(data["captions"])
    ids, mask = ids.to(device), mask.to(device)
    scores = []
    for i in range(0, n, 64):
        c = cand[i:i + 64]
        q = torch.arange(i, i + len(c), device=device).repeat_interleave(top_k)
        with autocast(device):
            scores.append(joint(ids[i:i + len(c)], mask[i:i + len(c)], toks[c.reshape(-1)],
                                text_index=q - i).float().reshape(len(c), top_k))
    scores = torch.cat(scores)
    reranked = torch.gather(cand, 1, scores.argsort(1, descending=True))
    w = cfg.joint_encoder.fusion_weight
    fused = torch.gather(cand, 1, (scores + w * torch.gather(sim, 1, cand)).argsort(1, descending=True))

    hit = torch.zeros(n, n, dtype=torch.bool, device=device)
    for i, rel in enumerate(data["relevant"]):
        hit[i, rel] = True

    def recall(order, k):
        return round(100 * torch.gather(hit, 1, order[:, :k]).any(1).float().mean().item(), 2)
    out = {"queries": n, "top_k": top_k, "first_stage_R@1": recall(cand, 1), "first_stage_R@5": recall(cand, 5),
           "reranked_R@1": recall(reranked, 1), "reranked_R@5": recall(reranked, 5),
           "candidate_recall": recall(cand, top_k)}
    if w:
        out.update({"fusion_weight": w, "fused_R@1": recall(fused, 1), "fused_R@5": recall(fused, 5)})
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["clip", "edje", "all"], default="all")
    ap.add_argument("--data", required=True, help="training scene shards (pipeline.make_scenes --split train): "
                    "braces, globs, commas; local paths or gs://, s3:// URLs")
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
    ap.add_argument("--batch_size_edje", type=int, default=64)
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
    ap.add_argument("--test_data", default=None, help="scene shards of a test split: report the rerank gain at the end")
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
    with deterministic(args.device):
        return _run(args)


def _run(args):
    torch.manual_seed(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    clip_dir = Path(args.output) / "clip"
    if args.backbone and args.stage != "edje":
        raise SystemExit("error: --backbone replaces the clip stage: use it with --stage edje")
    if args.backbone:
        from models.checkpoint import read_config
        backbone_cfg = read_config(args.backbone).backbone
    else:
        backbone_cfg = clip_backbone_config(args)
    transform = Backbone(backbone_cfg, load_pretrained=False).image_transform()
    data = load_scenes(args.data, transform, args.limit)
    train_idx, val_idx = split_validation(data["groups"], args.val_fraction)
    log.info("%d training samples (%d validation)", len(train_idx), len(val_idx))
    if args.stage in ("clip", "all"):
        clip_dir = train_clip(args, data, train_idx, val_idx)
    if args.stage in ("edje", "all"):
        final = train_edje(args, data, train_idx, val_idx, Path(args.backbone) if args.backbone else clip_dir / "backbone")
        if args.test_data:
            metrics = test_rerank_gain(final, args.test_data, args.device)
            (Path(args.output) / "test_metrics.json").write_text(json.dumps(metrics, indent=1))
            log.info("test split: %s", metrics)
        return final
    return clip_dir


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(run(argv))


if __name__ == "__main__":
    main()
    finish(0)
