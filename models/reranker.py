"""Python API for reranking without Beam.

    from models.reranker import Reranker
    rr = Reranker("STORE")                      # checkpoint: the one that built the store (default: embedded)
    rr.rank("a red circle left of a blue square", ["000000001", "000000002"], top_k=10)
    # -> [{"image_id": ..., "score": ..., "rank": 1}, ...]  (like CrossEncoder.rank)
    rr.score([("a red circle", "000000001"), ...])   # -> numpy array of logits
    Reranker("STORE", precision="int8")         # the joint encoder in int8 on the CPU (models.int8)
    Reranker("STORE", precision="auto")         # the fastest measured here (models.precision); .precision says which
    Reranker("s3://bucket/store", filesystem_options={"s3_endpoint_url": "http://...",
             "s3_access_key_id": ..., "s3_secret_access_key": ..., "s3_region_name": ...})

Scores are the same as the Beam rerank job's for the same pairs (same model, same packing).
A checkpoint with a learnt fusion weight w (``joint_encoder.fusion_weight``) ranks by
logit + w * first-stage cosine, as the rerank job does by default; ``rank`` then also returns
``fused_score``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from models.checkpoint import load_scorer
from models.joint_encoder import score_batch
from models.precision import resolve
from schemas.reader import TokenStore


class Reranker:
    def __init__(self, store, checkpoint=None, device: str = "cpu", batch_size: int = 64,
                 torch_threads: Optional[int] = None, filesystem_options=None, precision: str = "fp32"):
        self.store = store if isinstance(store, TokenStore) else TokenStore(store, filesystem_options)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.precision, self.precision_why = resolve(precision, device, "rerank")
        self.model, self.tokenizer, self.config, fingerprint = load_scorer(checkpoint, device, self.precision)
        self.store.require_fingerprint(fingerprint)
        self.device, self.batch_size = device, batch_size
        self.checkpoint = checkpoint
        self.fusion_weight = self.config.joint_encoder.fusion_weight
        self._text_encoder = None

    def _rows(self, image_ids: Sequence[str]):
        unique = list(dict.fromkeys(image_ids))
        found, tokens, embeddings, missing = self.store.get(unique)
        if missing:
            raise KeyError(f"{len(missing)} image id(s) not in the store, e.g. {missing[:5]}")
        return dict(zip(found, tokens)), dict(zip(found, embeddings))

    def first_stage_scores(self, query: str, image_ids: Sequence[str], embeddings=None) -> np.ndarray:
        """The first stage's cosine of ``query`` with each stored image embedding (what retrieve
        writes as candidate_scores), from the checkpoint's own text tower (retrieve's encoder)."""
        if self._text_encoder is None:
            from models.text_encoder import load_text_encoder
            self._text_encoder = load_text_encoder(self.checkpoint, self.device)[0]
        text = self._text_encoder.encode([query])[0]
        embeddings = embeddings if embeddings is not None else self._rows(image_ids)[1]
        return np.array([float(embeddings[i] @ text) for i in image_ids], np.float64)

    def score(self, pairs: Sequence[Tuple[str, str]]) -> np.ndarray:
        """(query text, image_id) pairs -> joint-encoder logits, in order. Unknown ids raise KeyError."""
        if not pairs:
            return np.zeros(0, np.float64)
        _check_texts(t for t, _ in pairs)
        return self._score(pairs, self._rows([image_id for _, image_id in pairs])[0])

    def _score(self, pairs, tokens: Dict[str, np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            out.append(score_batch(self.model, self.tokenizer, [t for t, _ in chunk],
                                   np.stack([tokens[i] for _, i in chunk]), self.device))
        return np.concatenate(out).astype(np.float64)

    def rank(self, query: str, image_ids: Sequence[str], top_k: Optional[int] = None,
             first_stage_scores: Optional[Sequence[float]] = None, fusion: Optional[bool] = None) -> List[dict]:
        """Sorted best first: [{"image_id", "score", "rank"}] (+ "fused_score" when fused); duplicate
        ids are scored once. ``fusion`` (default: whether the checkpoint has a fusion weight) ranks by
        logit + w * first-stage score: ``first_stage_scores`` (one per id, e.g. retrieve's
        candidate_scores), or when not given the cosine from ``first_stage_scores()``."""
        if first_stage_scores is not None and len(first_stage_scores) != len(image_ids):
            raise ValueError("first_stage_scores needs one score per image id")
        first = dict(zip(image_ids, first_stage_scores)) if first_stage_scores is not None else None
        ids = list(dict.fromkeys(image_ids))
        if not ids:
            return []
        _check_texts([query])
        tokens, embeddings = self._rows(ids)  # one store read for the logits and the cosines
        scores = self._score([(query, i) for i in ids], tokens)
        fused = self.fusion_weight > 0 if fusion is None else fusion
        key = scores
        if fused:
            cos = (np.array([float(first[i]) for i in ids]) if first is not None
                   else self.first_stage_scores(query, ids, embeddings))
            key = scores + (self.fusion_weight or 1.0) * cos
        order = sorted(range(len(ids)), key=lambda k: (-key[k], ids[k]))
        if top_k:
            order = order[:top_k]
        out = []
        for r, k in enumerate(order, start=1):
            row = {"image_id": ids[k], "score": float(scores[k]), "rank": r}
            if fused:
                row["fused_score"] = float(key[k])
            out.append(row)
        return out


def _check_texts(texts) -> None:
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("every query text must be a non-empty string")
