"""Held-out checks during and after training: scene-group accuracy, grounding per word class, and
recall@k of the first stage vs reranked (through ``evaluation.metrics``, the evaluate job's code)."""
import collections
import logging

import numpy as np
import torch

from models.mlm import grounding_report
from training.build import OBJECT_CLASSES, WORD_CLASSES
from training.objectives import autocast

log = logging.getLogger("train")

GROUNDING_ROWS = 512  # validation captions in each grounding evaluation
# Object words' own-image MLM accuracy when ITM started: 77-89% in every CPU run whose ITM took off,
# 63-65% in those that stayed at chance (docs/experiments.md, run sets R8 and R9).
GROUNDED_OBJECTS = 75.0


def grounding_rows(val_idx: np.ndarray) -> np.ndarray:
    """Up to GROUNDING_ROWS validation rows, evenly spaced: with several splits (sorted by directory)
    each is represented in proportion, not only the first one."""
    n = min(GROUNDING_ROWS, len(val_idx))
    return val_idx[np.linspace(0, len(val_idx) - 1, n).round().astype(int)] if n else val_idx[:0]


@torch.no_grad()
def eval_clip(backbone, images, texts, val_idx, groups, device):
    backbone.eval()
    with autocast(device):
        img = torch.cat([backbone(images[val_idx[i:i + 512]])[0] for i in range(0, len(val_idx), 512)])
        txt = torch.cat([backbone.encode_text(texts[val_idx[i:i + 512]]) for i in range(0, len(val_idx), 512)])
    sim = txt @ img.t()
    r1 = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().item()
    return {"val_t2i_r1": round(100 * r1, 2), "val_group_acc": round(100 * group_accuracy(sim, groups[val_idx]), 2)}


def group_accuracy(sim: torch.Tensor, groups: np.ndarray) -> float:
    """Caption -> its own image among its group's images (chance: 1 / group size)."""
    g = torch.as_tensor(groups, device=sim.device)
    same = g[:, None] == g[None, :]
    masked = sim.masked_fill(~same, float("-inf"))
    return (masked.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().item()


def warn_if_ungrounded(report: dict, step: int) -> bool:
    """Warn when the MLM-only steps end with the object words still poorly read from the image."""
    own = report.get("objects", {}).get("own")
    if own is None or own >= GROUNDED_OBJECTS:
        return False
    log.warning("step %d, end of the MLM-only steps: object words are filled in at %.1f%% from the caption's own "
                "image; ITM has taken off only from ~%.0f%% in measured runs (docs/experiments.md, run sets R8 and R9): "
                "more --mlm_only_steps may be needed", step, own, GROUNDED_OBJECTS)
    return True


@torch.no_grad()
def eval_grounding(mlm, adapter, joint, patch, grounding):
    """Masked-word accuracy per word class on the validation captions of ``grounding`` (ids, mask,
    word classes, their rows from ``grounding_rows``): own image, another group's image, no image."""
    adapter.eval(), joint.eval()
    g_ids, g_mask, g_cls, rows = grounding
    tokens = adapter(patch[rows])
    return grounding_report(mlm, joint, g_ids, g_mask, g_cls, tokens, tokens.roll(4, 0), WORD_CLASSES,
                            unions={"objects": OBJECT_CLASSES})


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


def _ranked(sim: torch.Tensor, scores: torch.Tensor, cand: torch.Tensor, w: float):
    """Per query: (first-stage scores of its candidates, rerank keys, joint logits)."""
    first = torch.gather(sim, 1, cand)
    return first, scores + w * first if w else scores, scores


def recall_report(keys, captions, relevant, sim, cand, scores, w: float, ks=(1, 5, 10)) -> dict:
    """T2I and I2T recall@k, first stage vs reranked (and the joint encoder alone when fused), by
    ``evaluation.metrics.evaluate``: the numbers its report would print for these scores."""
    from evaluation.inputs import Query, Scored
    from evaluation.metrics import evaluate
    first, key, logit = _ranked(sim, scores, cand, w)
    queries, scored = {}, {}
    for q in range(len(cand)):
        ids = [keys[j] for j in cand[q].tolist()]
        qid = f"q{q}"
        queries[qid] = Query(qid, captions[q], ids, first[q].tolist(), frozenset(keys[j] for j in relevant[q]))
        order = key[q].argsort(descending=True).tolist()
        scored[qid] = [Scored(ids[j], r, float(key[q, j]), float(logit[q, j]), bool(w))
                       for r, j in enumerate(order, start=1)]
    report, _ = evaluate(queries, scored, ks=tuple(k for k in ks if k <= cand.shape[1]))
    return {mode: report[mode] for mode in ("t2i", "i2t")} | {"queries": report["counts"]["queries"],
                                                           "candidate_recall": report["counts"]["t2i_candidate_recall"]}


class HeldOut:
    """Held-out image-caption shards, read once (at most ``limit`` samples, in memory), on which a
    run reports recall@k of the frozen backbone's cosine (the first stage) over the whole held-out
    set against the joint encoder reranking its top ``top_k``. A caption's relevant images are
    those with the identical caption."""

    def __init__(self, pattern: str, transform, limit: int, top_k: int):
        from training.scenes import training_shards
        from training.stream import decode_sample, read_shard
        self.images, self.captions = [], []
        self.counts = collections.Counter()
        for shard in training_shards(pattern):  # in order, unshuffled
            for sample in read_shard(shard, self.counts):
                item = decode_sample(sample, transform, self.counts)
                if item is not None:
                    self.images.append(item[0]), self.captions.append(item[1])
                if limit and len(self.images) >= limit:
                    break
            if limit and len(self.images) >= limit:
                break
        if len(self.images) < 2:
            raise SystemExit(f"error: --val_data {pattern}: fewer than 2 usable held-out samples")
        self.images = torch.stack(self.images)
        self.keys = [f"v{i}" for i in range(len(self.captions))]
        by_caption = {}
        for i, c in enumerate(self.captions):
            by_caption.setdefault(c, []).append(i)
        self.relevant = [by_caption[c] for c in self.captions]
        self.top_k = min(top_k, len(self.captions))

    @torch.no_grad()
    def evaluate(self, backbone, adapter, joint, tokenizer, fusion_weight: float, device: str) -> dict:
        adapter.eval(), joint.eval()
        tok_clip = backbone.tokenizer()
        toks, img, txt = [], [], []
        with autocast(device):
            for i in range(0, len(self.captions), 256):
                e, p = backbone(self.images[i:i + 256].to(device))
                toks.append(adapter(p).float()), img.append(e.float())
                txt.append(backbone.encode_text(tok_clip(self.captions[i:i + 256]).to(device)).float())
        return rerank_report(torch.cat(toks), torch.cat(img), torch.cat(txt), self.captions, self.keys, self.relevant,
                             joint, tokenizer, fusion_weight, self.top_k, device)


@torch.no_grad()
def rerank_report(tokens, img, txt, captions, keys, relevant, joint, tokenizer, w, top_k, device) -> dict:
    """First stage (cosine over all images) vs the joint encoder over each caption's top k."""
    sim = txt @ img.t()
    top_k = min(top_k, len(sim))
    cand = sim.topk(top_k, dim=1).indices
    ids, mask = tokenizer(captions)
    ids, mask = ids.to(device), mask.to(device)
    scores = []
    for i in range(0, len(sim), 64):
        c = cand[i:i + 64]
        q = torch.arange(len(c), device=device).repeat_interleave(top_k)
        with autocast(device):
            scores.append(joint(ids[i:i + len(c)], mask[i:i + len(c)], tokens[c.reshape(-1)],
                                text_index=q).float().reshape(len(c), top_k))
    return recall_report(keys, captions, relevant, sim.cpu(), cand.cpu(), torch.cat(scores).cpu(), w)


@torch.no_grad()
def test_rerank_gain(checkpoint, pattern: str, device: str, top_k: int = 20, limit: int = 0) -> dict:
    """Quick check on a test split of the scenes without Beam: T2I R@1/5 of the first stage
    (backbone cosine over the whole split) vs the joint encoder reranking its top-k (fp32 tokens),
    alone and fused with the first stage by the checkpoint's fusion weight (``fused_*``)."""
    from models.checkpoint import load_joint_encoder, load_vision_encoder
    from training.scenes import load_scenes
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
    w = cfg.joint_encoder.fusion_weight
    alone = rerank_report(toks, img, txt, data["captions"], data["keys"], data["relevant"], joint, tokenizer, 0.0,
                          top_k, device)
    out = {"queries": alone["queries"], "top_k": min(top_k, len(data["keys"])),
           "first_stage_R@1": alone["t2i"]["first_stage"]["R@1"], "first_stage_R@5": alone["t2i"]["first_stage"]["R@5"],
           "reranked_R@1": alone["t2i"]["reranked"]["R@1"], "reranked_R@5": alone["t2i"]["reranked"]["R@5"],
           "candidate_recall": alone["candidate_recall"]}
    if w:
        fused = rerank_report(toks, img, txt, data["captions"], data["keys"], data["relevant"], joint, tokenizer, w,
                              top_k, device)
        out.update({"fusion_weight": w, "fused_R@1": fused["t2i"]["reranked"]["R@1"],
                    "fused_R@5": fused["t2i"]["reranked"]["R@5"], "i2t": fused["i2t"]})
    return out


def test_split_gains(checkpoint, pattern: str, device: str) -> dict:
    """``test_rerank_gain`` on a test split; on several splits' directories (2- and 3-object scenes,
    say), each split on its own under ``by_split``: its queries search its own images."""
    import posixpath
    from training.scenes import training_shards
    paths = training_shards(pattern)
    directories = sorted({posixpath.dirname(p) for p in paths})
    if len(directories) == 1:
        return test_rerank_gain(checkpoint, pattern, device)
    return {"by_split": {d: test_rerank_gain(checkpoint, ",".join(p for p in paths if posixpath.dirname(p) == d),
                                             device) for d in directories}}
