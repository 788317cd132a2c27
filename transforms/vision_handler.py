"""Beam ModelHandler for backbone + adapter: loads the checkpoint once per worker, runs batches."""
import logging
from typing import Any, Dict, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler

from models.checkpoint import VisionEncoder, load_vision_encoder, resolve_device

log = logging.getLogger(__name__)

# On a GPU bf16 and fp16 autocast the forward; on the CPU bf16 runs a bf16 copy of the model and int8
# ONNX Runtime (models.checkpoint.load_vision_encoder, models.precision)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}


class EncodedImage(NamedTuple):
    tokens: np.ndarray  # (m, h) float32, adapter output
    embedding: np.ndarray  # (d,) float32, L2-normalised


class VisionModelHandler(ModelHandler[torch.Tensor, EncodedImage, VisionEncoder]):
    """Images (3, H, W float tensors, already preprocessed) -> :class:`EncodedImage`.

    ``torch_threads`` is fixed (not "all cores") because intra-op parallelism may change float
    reductions, and the stored bytes must not depend on the machine.
    """

    def __init__(self, checkpoint: Optional[str], device: str = "cpu", precision: str = "fp32",
                 torch_threads: int = 1, batch_size: int = 32):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}")
        self.checkpoint = checkpoint
        self.device = device
        self.precision = precision
        self.torch_threads = torch_threads
        self.batch_size = batch_size

    def load_model(self) -> VisionEncoder:
        torch.set_num_threads(self.torch_threads)
        encoder, _, fingerprint = load_vision_encoder(self.checkpoint, resolve_device(self.device), self.precision)
        log.info("loaded vision encoder %s on %s (%s)", fingerprint[:12], self.device, self.precision)
        return encoder

    def run_inference(self, batch: Sequence[torch.Tensor], model: VisionEncoder,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[EncodedImage]:
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        images = torch.stack(list(batch)).to(self.device, non_blocking=True)
        dtype = PRECISIONS[self.precision] if self.device.startswith("cuda") else None
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            tokens, embedding = model(images)
        tokens = tokens.float().cpu().numpy()
        embedding = embedding.float().cpu().numpy()
        return [EncodedImage(t, e) for t, e in zip(tokens, embedding)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "edje_vision"
