"""Training objectives: CLIP contrastive loss, hard-negative mining, listwise ITM (EDJE Sec. 3.3)."""
import torch
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              same: torch.Tensor = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of L2-normalised (image, text) pairs.

    ``same``: optional (B, B) bool, True where pair (i, j) is also a true match (identical
    captions): those off-diagonal entries are masked out of the softmax."""
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.t()
    if same is not None:
        off = same & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def hardest_negatives(similarity: torch.Tensor, k: int, not_negative: torch.Tensor,
                      prefer: torch.Tensor = None) -> torch.Tensor:
    """(B, B) similarity of queries (rows) to items (columns) -> (B, k) column indices of the k most
    similar items that are not matches. ``not_negative`` (B, B) bool marks matches to skip (the
    diagonal, identical captions, the same image). ``prefer`` (B, B) bool: items taken before any
    other, most similar first (a scene's known minimal variants, which the frozen backbone that
    mines the rest may already tell apart and so never pick)."""
    if prefer is not None:
        similarity = similarity + prefer * (2 * similarity.abs().max() + 1)
    masked = similarity.masked_fill(not_negative, float("-inf"))
    k = min(k, int((~not_negative).sum(1).min()))
    return masked.topk(k, dim=1).indices


def random_negatives(not_negative: torch.Tensor, generator: torch.Generator = None) -> torch.Tensor:
    """(B,) one uniformly random non-matching column per row."""
    weights = (~not_negative).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def listwise_itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1 + n) logits, column 0 the positive pair: softmax cross-entropy over each list."""
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
