"""Grounded MLM for the joint encoder: which caption words may be masked, the loss, and how well
masked words are predicted per word class with the own image, another image and no image."""
from typing import Dict, List, Sequence

import torch

from models.joint_encoder import MAX_TEXT_CHARS
from models.losses import MaskedLMHead, mask_one_class, mask_words

# Words that say nothing about the image: masking them teaches text statistics, not grounding.
STOP_WORDS = frozenset("a an the of to is there and with its it on at picture , .".split())
SPATIAL_WORDS = frozenset("left right above below top bottom".split())
RULES = ("all", "content", "spatial")


def caption_words(tokenizer, texts: Sequence[str], rule: str):
    """Tokenizes like ``Tokenizer.__call__`` and numbers each caption's maskable words under ``rule``
    (all words / content words: not in STOP_WORDS / spatial words only). Returns (ids, attention
    mask, words (N, T) long with -1 where a token is never masked, word strings per caption)."""
    if rule not in RULES:
        raise ValueError(f"MLM word rule must be one of {RULES}, not {rule!r}")
    ids, mask = tokenizer(list(texts))
    texts = [t[:MAX_TEXT_CHARS] for t in texts]
    enc = tokenizer.tok(texts, padding=True, truncation=True,
                        max_length=tokenizer.max_tokens)
    words = torch.full(ids.shape, -1, dtype=torch.long)
    strings: List[List[str]] = []
    for row, text in enumerate(texts):
        word_ids = enc.word_ids(row)
        spans = {}
        for t, w in enumerate(word_ids):
            if w is not None:
                span = enc.word_to_chars(row, w)
                spans[w] = text[span.start:span.end].lower()
        strings.append([spans[w] for w in sorted(spans)])
        number = {w: k for k, w in enumerate(sorted(spans))}
        for t, w in enumerate(word_ids):
            if w is None:
                continue
            word = spans[w]
            keep = (rule == "all" or (rule == "content" and word not in STOP_WORDS)
                    or (rule == "spatial" and word in SPATIAL_WORDS))
            if keep:
                words[row, t] = number[w]
    return ids, mask, words, strings


class Mlm:
    """The MLM objective: a batch's captions with some whole words masked are read with image
    tokens, and the masked tokens predicted (weight ``weight`` in the training loss)."""

    def __init__(self, head: MaskedLMHead, mask_id: int, weight: float, probability: float, by_class: bool = False,
                 union: Sequence[int] = ()):
        self.head, self.mask_id, self.weight, self.probability = head, mask_id, weight, probability
        self.by_class = by_class  # ``words`` then holds word classes: one whole class is masked per row
        self.union = tuple(union)  # with by_class: masking all these classes at once is one more choice

    def masks(self, ids, words, gen=None):
        """(masked ids, labels: -100 where nothing is to be predicted) under this objective's rule."""
        if self.by_class:
            return mask_one_class(ids, words, self.mask_id, gen, self.union)
        return mask_words(ids, words, self.mask_id, self.probability, gen)

    def loss(self, joint, ids, mask, words, tokens, gen=None):
        masked, labels = self.masks(ids, words, gen)
        _, hidden = joint(masked, mask, tokens, return_hidden=True)
        return self.head.loss(hidden[:, :ids.shape[1]], labels)

    @torch.no_grad()
    def accuracy(self, joint, ids, mask, selected, tokens) -> float:
        """Share of the ``selected`` (B, T) tokens predicted right when all of them are masked."""
        masked = ids.masked_fill(selected, self.mask_id)
        _, hidden = joint(masked, mask, tokens, return_hidden=True)
        h = hidden[:, :ids.shape[1]][selected]
        if not len(h):
            return float("nan")
        logits = self.head.transform(h) @ self.head._tied[0].weight.t() + self.head.bias
        return (logits.argmax(-1) == ids[selected]).float().mean().item()


def grounding_report(mlm: Mlm, joint, ids, mask, word_class: torch.Tensor, tokens: torch.Tensor,
                     other_tokens: torch.Tensor, classes: Dict[int, str], batch: int = 256,
                     unions: Dict[str, Sequence[int]] = None) -> dict:
    """Masked-word accuracy per word class (all words of the class masked at once), reading the
    caption's own image, another image (``other_tokens``: a different scene's) and no image (zero
    tokens). ``word_class`` (N, T): a class number per token, -1 for none. Own minus other is what
    the image adds beyond the caption's text. ``unions``: also name -> classes masked together."""
    out = {}
    groups = {name: (c,) for c, name in classes.items()}
    groups.update(unions or {})
    for name, members in groups.items():
        in_group = torch.isin(word_class, torch.tensor(members, device=word_class.device))
        rows = torch.nonzero(in_group.any(1)).squeeze(1)
        if not len(rows):
            continue
        row = {}
        for label, source in (("own", tokens), ("other", other_tokens), ("none", torch.zeros_like(tokens))):
            hits = total = 0
            for i in range(0, len(rows), batch):
                r = rows[i:i + batch]
                sel = in_group[r]
                acc = mlm.accuracy(joint, ids[r], mask[r], sel, source[r])
                n = int(sel.sum())
                hits, total = hits + acc * n, total + n
            row[label] = round(100 * hits / total, 1)
        out[name] = row
    return out
