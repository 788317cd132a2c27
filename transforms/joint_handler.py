"""Beam ModelHandler for the joint encoder: (text, image tokens) pairs -> logits."""
import logging
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler

from models.checkpoint import load_scorer, resolve_device
from models.joint_encoder import score_batch

log = logging.getLogger(__name__)

Pair = Tuple[str, np.ndarray]  # (query text, float32 (m, h) image tokens)


class JointScorerHandler(ModelHandler[Pair, float, Any]):
    """Loads the checkpoint's joint encoder once per worker; scores batches of pairs."""

    def __init__(self, checkpoint: Optional[str], device: str = "cpu", torch_threads: int = 1,
                 batch_size: int = 64, precision: str = "fp32"):
        super().__init__()
        self.checkpoint, self.device = checkpoint, device
        self.torch_threads, self.batch_size = torch_threads, batch_size
        self.precision = precision  # fp32, or int8 (CPU, models.int8)

    def load_model(self):
        torch.set_num_threads(self.torch_threads)
        model, tokenizer, _, fingerprint = load_scorer(self.checkpoint, resolve_device(self.device), self.precision)
        log.info("loaded joint encoder %s on %s (%s)", fingerprint[:12], self.device, self.precision)
        model.tokenizer = tokenizer  # one object: Beam's model sharing keeps a weak reference to it
        return model

    def run_inference(self, batch: Sequence[Pair], model, inference_args: Optional[Dict[str, Any]] = None
                      ) -> Iterable[float]:
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        texts = [text for text, _ in batch]
        tokens = np.stack([t for _, t in batch])
        return [float(x) for x in score_batch(model, model.tokenizer, texts, tokens, self.device)]

    def batch_elements_kwargs(self):
        # Only for RunInference users: the rerank job (transforms/score_pairs.py) cuts its own full
        # batches per shard group and calls run_inference directly.
        return {"min_batch_size": 1, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "edje_joint"
