"""Training objectives: CLIP contrastive loss, hard-negative mining, listwise ITM (EDJE Sec. 3.3)."""
from typing import Sequence

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


def listwise_itm_loss(logits: torch.Tensor, captions: torch.Tensor, images: torch.Tensor, n: int) -> torch.Tensor:
    """Listwise ITM in both directions over scored pairs of a batch of n matching (caption, image)
    items: pair p is (captions[p], images[p]) with logit logits[p], and (i, i) must be among them.
    Caption i's softmax runs over every scored image of row i, image j's over every scored caption
    of column j; the loss is the mean cross-entropy of the true partner, over both directions."""
    matrix = torch.full((n, n), float("-inf"), dtype=logits.dtype, device=logits.device)
    matrix = matrix.index_put((captions, images), logits)
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(matrix, target) + F.cross_entropy(matrix.t(), target)) / 2


class MaskedLMHead(torch.nn.Module):
    """BERT's MLM head over a joint encoder's text positions: dense + GELU + LayerNorm, then a
    decoder tied to the (frozen) word embeddings. Training only: checkpoints do not store it."""

    def __init__(self, word_embeddings: torch.nn.Embedding, layer_norm_eps: float = 1e-12):
        super().__init__()
        h = word_embeddings.embedding_dim
        self.transform = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.GELU(),
                                             torch.nn.LayerNorm(h, eps=layer_norm_eps))
        self._tied = [word_embeddings]  # shared, and kept out of this module's parameters and state
        self.bias = torch.nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """hidden (B, T, h) at the text positions, labels (B, T) with -100 where unmasked."""
        keep = labels != -100
        logits = self.transform(hidden[keep]) @ self._tied[0].weight.t() + self.bias
        return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)


def _present(labels: torch.Tensor):
    """(B, T) per-token numbers (-1: none) -> (B, n) bool, number k occurs in row b; None if no row has any."""
    n = int(labels.max()) + 1 if labels.numel() else 0
    if n <= 0:
        return None
    present = torch.zeros(labels.shape[0], n + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, labels.clamp(min=-1) + 1, True)
    return present[:, 1:]


def mask_words(ids: torch.Tensor, words: torch.Tensor, mask_id: int, probability: float,
               generator: torch.Generator = None):
    """Whole-word masking for MLM: ``words`` (B, T) gives each token's word number within its row, -1
    for tokens never masked (special tokens, padding, words a rule keeps visible). Each maskable word
    is chosen with ``probability`` (at least one per row that has any) and all its tokens are
    replaced by ``mask_id``. Returns (masked ids, labels) with labels -100 where nothing is to be
    predicted."""
    present = _present(words)
    if present is None:
        return ids.clone(), torch.full_like(ids, -100)
    draw = torch.rand(present.shape, generator=generator, device=ids.device)
    chosen = present & (draw < probability)
    fallback = draw.masked_fill(~present, -1.0).argmax(1)
    empty = ~chosen.any(1) & present.any(1)
    chosen[empty, fallback[empty]] = True
    token_chosen = torch.gather(torch.cat([torch.zeros_like(chosen[:, :1]), chosen], 1), 1, words + 1)
    return ids.masked_fill(token_chosen, mask_id), ids.masked_fill(~token_chosen, -100)


def mask_one_class(ids: torch.Tensor, word_class: torch.Tensor, mask_id: int, generator: torch.Generator = None,
                   union: Sequence[int] = ()):
    """MLM masking by word class: ``word_class`` (B, T) gives each token a class number (-1: none).
    Each row masks every token of one class drawn uniformly among the classes it has (e.g. all its
    colour words at once), so a masked word cannot be inferred by elimination from the others of
    its kind, only by binding. ``union``: one more choice, every token of these classes at once
    (a row needs two of them). Returns (masked ids, labels) like ``mask_words``."""
    present = _present(word_class)
    if present is None:
        return ids.clone(), torch.full_like(ids, -100)
    union = [c for c in union if c < present.shape[1]]
    if union:
        present = torch.cat([present, present[:, union].sum(1, keepdim=True) >= 2], 1)
    draw = torch.rand(present.shape, generator=generator, device=ids.device).masked_fill(~present, -1.0)
    pick = draw.argmax(1)
    chosen = word_class == pick[:, None]
    if union:
        chosen |= (pick == present.shape[1] - 1)[:, None] & torch.isin(word_class, torch.tensor(union, device=ids.device))
    chosen &= present.any(1, keepdim=True)
    return ids.masked_fill(chosen, mask_id), ids.masked_fill(~chosen, -100)
