"""Beam ModelHandler for the backbone's text tower: query texts -> L2-normalised embeddings.

The first-stage embedding of a query lives in the same space as the stored image ``embedding``
column (same open_clip model, same checkpoint), so cosine similarity is a dot product.
"""
import logging
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler

from models.text_encoder import TextEncoder, load_text_encoder

log = logging.getLogger(__name__)


class TextModelHandler(ModelHandler[str, np.ndarray, TextEncoder]):
    """Query texts -> (d,) float32 L2-normalised embeddings, one per text.

    Wrap it in ``KeyedModelHandler`` to carry query ids through ``RunInference``. As in the
    vision handler, ``torch_threads`` is fixed (not "all cores") so that float reductions, and
    so the scores, do not depend on the machine.
    """

    def __init__(self, checkpoint: Optional[str], device: str = "cpu", torch_threads: int = 1,
                 batch_size: int = 64):
        super().__init__()
        self.checkpoint = checkpoint
        self.device = device
        self.torch_threads = torch_threads
        self.batch_size = batch_size

    def load_model(self) -> TextEncoder:
        torch.set_num_threads(self.torch_threads)
        encoder, fingerprint = load_text_encoder(self.checkpoint, self.device)
        log.info("loaded text encoder %s on %s", fingerprint[:12], self.device)
        return encoder

    def run_inference(self, batch: Sequence[str], model: TextEncoder,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[np.ndarray]:
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return list(model.encode(batch))

    def batch_elements_kwargs(self):
        return {"max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "edje_text"
