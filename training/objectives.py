"""EDJE's objectives over a (possibly data-parallel) batch: listwise ITM in both directions with
mined negatives, grounded MLM, the learnt fusion with the first stage, and distillation from a
teacher that reads more tokens.

Across processes the global batch is what a single process would see: every rank gathers the
others' adapter tokens (with gradients), first-stage embeddings and captions, mines the same
negatives from one shared random stream, scores its own share of the pairs, and gathers the
logits (with gradients), so each rank computes the same loss. The all-gathers' backward sums
that loss's gradient over the ranks, and DDP's average then gives exactly the single-process
gradient.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.losses import hardest_negatives, listwise_itm_loss, random_negatives
from training.batches import EdjeBatch
from training.distributed import World, gather, total


class Fusion(nn.Module):
    """The weight w of ``logit + w * first-stage cosine``, learnt with the listwise loss; it lands in
    the checkpoint's config (``joint_encoder.fusion_weight``) and rerank ranks by that sum."""

    def __init__(self, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(init))


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


class EdjeObjective(nn.Module):
    """The trained parts (adapter, joint encoder, MLM head, fusion weight) and the loss over a
    batch; ``forward`` is what DDP wraps. ``mlm``: an ``models.mlm.Mlm`` (its head is registered
    here) or None; ``sibling_negatives``: a scene's variants (same group) are the first negatives."""

    def __init__(self, adapter, joint, mlm=None, fusion=None, sibling_negatives=True, world: World = World(),
                 teacher=None, distill_weight: float = 0.0):
        super().__init__()
        self.adapter, self.joint, self.fusion = adapter, joint, fusion
        self.mlm = mlm
        self.mlm_head = mlm.head if mlm is not None else None
        self.sibling_negatives, self.world = sibling_negatives, world
        # (adapter, joint encoder) of a frozen teacher over the same patch tokens, e.g. one with no
        # compression (m = n); a tuple, so that it is no submodule: DDP and the optimizer never see it
        self.teacher, self.distill_weight = (tuple(teacher) if teacher is not None else None), distill_weight

    def forward(self, batch: EdjeBatch, hard: int, gen: torch.Generator, itm: bool = True, mlm_weight: float = 0.0):
        """-> (loss, (t2i accuracy, loss summed over the ranks' shares / ranks)). ``itm`` False:
        the MLM objective alone on the positives; else ITM (+ ``mlm_weight`` * MLM)."""
        device = batch.patch.device
        with autocast(str(device)):
            tokens = self.adapter(batch.patch)
            if not itm:
                loss = self._mlm(batch, tokens, gen, width=int(gather(batch.mask, self.world).sum(1).max()))
                return loss, (float("nan"), self._reported(loss))
            loss, acc, width = self._itm(batch, tokens, hard, gen)
            if mlm_weight:
                loss = loss + mlm_weight * self._mlm(batch, tokens, gen, width)
        return loss, (acc, self._reported(loss))

    def _reported(self, loss) -> float:
        return total(loss.item(), self.world) / self.world.size

    def _itm(self, batch: EdjeBatch, tokens, hard, gen):
        """The pairs scored are the positives, each caption's ``hard`` hardest images and each image's
        hardest captions (a scene's siblings first), and one random negative per caption and per
        image. Each pair is scored once and serves both directions: caption i's softmax runs over
        every scored pair in row i of the (captions x images) matrix, image j's over column j."""
        w = self.world
        ids, mask = gather(batch.ids, w), gather(batch.mask, w)
        img_emb, txt_emb = gather(batch.img_emb, w), gather(batch.txt_emb, w)
        cap_key, img_key = gather(batch.caption_key, w), gather(batch.image_key, w)
        all_tokens = gather(tokens, w, grad=True)
        b = len(ids)
        device = ids.device
        rows = torch.arange(b, device=device)
        not_neg = (cap_key[:, None] == cap_key[None, :]) | (img_key[:, None] == img_key[None, :]) \
            | torch.eye(b, dtype=torch.bool, device=device)
        siblings = None
        if self.sibling_negatives and batch.group is not None:
            g = gather(batch.group, w)
            siblings = g[:, None] == g[None, :]
        sim = txt_emb @ img_emb.t()  # captions x images, from the frozen backbone
        scored = torch.eye(b, dtype=torch.bool, device=device)
        if hard:
            scored[rows[:, None], hardest_negatives(sim, hard, not_neg, siblings)] = True
            scored[hardest_negatives(sim.t(), hard, not_neg.t(), None if siblings is None else siblings.t()),
                   rows[:, None]] = True
        scored[rows, random_negatives(not_neg, gen)] = True
        scored[random_negatives(not_neg.t(), gen), rows] = True
        cap, img = scored.nonzero(as_tuple=True)
        width = int(mask.sum(1).max())  # drop the padding no caption of this batch needs
        ids, mask = ids[:, :width], mask[:, :width]
        if w.size == 1:
            logits = self.joint(ids, mask, all_tokens[img], text_index=cap).float()
        else:  # this rank's share of the pairs, then everyone's logits
            share = math.ceil(len(cap) / w.size)
            mine = slice(w.rank * share, min(len(cap), (w.rank + 1) * share))
            local = self.joint(ids, mask, all_tokens[img[mine]], text_index=cap[mine]).float()
            local = F.pad(local, (0, share - len(local)))
            logits = gather(local, w, grad=True)[:len(cap)]
        distill = self._distill(batch, logits, ids, mask, cap, img) if self.teacher is not None else None
        if self.fusion is not None:
            logits = logits + self.fusion.weight * sim[cap, img]
        loss = listwise_itm_loss(logits, cap, img, b)
        if distill is not None:
            loss = loss + self.distill_weight * distill
        t2i = torch.full((b, b), float("-inf"), device=device).index_put((cap, img), logits.detach())
        return loss, (t2i.argmax(1) == rows).float().mean().item(), width

    @torch.no_grad()
    def _teacher_logits(self, batch: EdjeBatch, ids, mask, cap, img):
        adapter, joint = self.teacher
        w = self.world
        tokens = gather(adapter(batch.patch), w)
        if w.size == 1:
            return joint(ids, mask, tokens[img], text_index=cap).float()
        share = math.ceil(len(cap) / w.size)
        mine = slice(w.rank * share, min(len(cap), (w.rank + 1) * share))
        local = F.pad(joint(ids, mask, tokens[img[mine]], text_index=cap[mine]).float(), (0, share - (mine.stop - mine.start)))
        return gather(local, w)[:len(cap)]

    def _distill(self, batch: EdjeBatch, logits, ids, mask, cap, img):
        """EDJE's distillation: every scored pair's logit (the joint encoder's own, before fusion)
        against the teacher's match probability, by binary cross-entropy."""
        target = torch.sigmoid(self._teacher_logits(batch, ids, mask, cap, img))
        return F.binary_cross_entropy_with_logits(logits, target)

    def _mlm(self, batch: EdjeBatch, tokens, gen, width):
        """Captions with masked words read with their own image. Masks are drawn for the global
        batch from the shared stream; each rank predicts its own rows, weighted so that the ranks'
        average is the global mean."""
        w = self.world
        if w.size == 1:
            return self.mlm.loss(self.joint, batch.ids[:, :width], batch.mask[:, :width], batch.words[:, :width],
                                 tokens, gen)
        ids, words = gather(batch.ids, w)[:, :width], gather(batch.words, w)[:, :width]
        masked, labels = self.mlm.masks(ids, words, gen)
        share = len(batch.ids)
        mine = slice(w.rank * share, (w.rank + 1) * share)
        count = max(1, int((labels != -100).sum()))
        _, hidden = self.joint(masked[mine], batch.mask[:, :width], tokens, return_hidden=True)
        return self.mlm.head.loss(hidden[:, :width], labels[mine], reduction="sum") * (w.size / count)
