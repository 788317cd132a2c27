"""Python API for reranking without Beam.

    from models.reranker import Reranker
    rr = Reranker("STORE")                      # checkpoint: the one that built the store (default: embedded)
    rr.rank("a red circle left of a blue square", ["000000001", "000000002"], top_k=10)
    # -> [{"image_id": ..., "score": ..., "rank": 1}, ...]  (like CrossEncoder.rank)
    rr.score([("a red circle", "000000001"), ...])   # -> numpy array of logits

Scores are the same as the Beam rerank job's for the same pairs (same model, same packing).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from models.checkpoint import load_scorer
from models.joint_encoder import score_batch
from schemas.reader import TokenStore


class Reranker:
    def __init__(self, store, checkpoint=None, device: str = "cpu", batch_size: int = 64,
                 torch_threads: Optional[int] = None):
        self.store = store if isinstance(store, TokenStore) else TokenStore(store)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model, self.tokenizer, self.config, fingerprint = load_scorer(checkpoint, device)
        self.store.require_fingerprint(fingerprint)
        self.device, self.batch_size = device, batch_size

    def _tokens(self, image_ids: Sequence[str]) -> Dict[str, np.ndarray]:
        unique = list(dict.fromkeys(image_ids))
        found, tokens, _, missing = self.store.get(unique)
        if missing:
            raise KeyError(f"{len(missing)} image id(s) not in the store, e.g. {missing[:5]}")
        return dict(zip(found, tokens))

    def score(self, pairs: Sequence[Tuple[str, str]]) -> np.ndarray:
        """(query text, image_id) pairs -> joint-encoder logits, in order. Unknown ids raise KeyError."""
        if not pairs:
            return np.zeros(0, np.float64)
        for text, _ in pairs:
            if not isinstance(text, str) or not text.strip():
                raise ValueError("every query text must be a non-empty string")
        tokens = self._tokens([image_id for _, image_id in pairs])
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            out.append(score_batch(self.model, self.tokenizer, [t for t, _ in chunk],
                                   np.stack([tokens[i] for _, i in chunk]), self.device))
        return np.concatenate(out).astype(np.float64)

    def rank(self, query: str, image_ids: Sequence[str], top_k: Optional[int] = None) -> List[dict]:
        """Sorted best first: [{"image_id", "score", "rank"}]; duplicate ids are scored once."""
        ids = list(dict.fromkeys(image_ids))
        scores = self.score([(query, i) for i in ids])
        order = sorted(range(len(ids)), key=lambda k: (-scores[k], ids[k]))
        if top_k:
            order = order[:top_k]
        return [{"image_id": ids[k], "score": float(scores[k]), "rank": r} for r, k in enumerate(order, start=1)]
