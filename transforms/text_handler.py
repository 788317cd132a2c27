"""Beam ModelHandler for the backbone's text tower: query texts -> L2-normalised embeddings.

The first-stage embedding of a query lives in the same space as the stored image ``embedding``
column (same open_clip model, same checkpoint), so cosine similarity is a dot product.
"""
import logging
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler

from models.checkpoint import load_vision_encoder
from transforms.vision_handler import resolve_device

log = logging.getLogger(__name__)


# Texts go through the tower in chunks of exactly this many rows (the last one padded): the GEMM
# kernels pick their blocking by row count (1-3 texts round differently from 4+ on AVX2), so a
# fixed count makes a text's embedding independent of its batch, and so of the runner's bundles.
CHUNK = 8


class TextEncoder:
    """The backbone (text tower used) and its open_clip tokenizer; what a worker holds."""

    def __init__(self, backbone, tokenizer, device: str):
        self.backbone, self.tokenizer, self.device = backbone, tokenizer, device

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (n, d) float32, L2-normalised, the same for a text whatever else is in the
        batch. Texts past the context length are truncated."""
        token_ids = self.tokenizer(list(texts))
        n = token_ids.shape[0]
        padded = torch.cat([token_ids, token_ids[-1:].expand(-n % CHUNK, -1)])
        with torch.inference_mode():
            out = [self.backbone.encode_text(chunk).float() for chunk in padded.to(self.device).split(CHUNK)]
        return torch.cat(out)[:n].cpu().numpy()


def load_text_encoder(checkpoint: Optional[str], device: str = "cpu"):
    """-> (TextEncoder, fingerprint). Loads the checkpoint's backbone (and adapter, unused here)."""
    encoder, _, fingerprint = load_vision_encoder(checkpoint, resolve_device(device))
    return TextEncoder(encoder.backbone, encoder.backbone.tokenizer(), device), fingerprint


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
