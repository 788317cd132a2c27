"""Frozen open_clip backbone: one forward pass gives the pooled embedding and the patch tokens."""
import copy
import logging
from dataclasses import dataclass
from typing import Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from models.config import JsonConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneConfig(JsonConfig):
    """Which open_clip model to build.

    Exactly one of ``model_name`` (an open_clip architecture, e.g. ``ViT-B-16``) or
    ``model_config`` (an open_clip model config dict: embed_dim, vision_cfg, text_cfg) is set.
    Weights come from the checkpoint's safetensors (keys ``backbone.*``) when present, else
    from ``weights_file`` (a local file), else from the open_clip ``pretrained`` tag, which
    needs the weights in open_clip's local cache: nothing is downloaded.
    """
    model_name: Optional[str] = None
    model_config: Optional[dict] = None
    pretrained: Optional[str] = None
    weights_file: Optional[str] = None

    def __post_init__(self):
        if (self.model_name is None) == (self.model_config is None):
            raise ValueError("backbone: set exactly one of model_name or model_config")


    def describe(self) -> str:
        if self.model_name:
            return self.model_name + (f"/{self.pretrained}" if self.pretrained else "")
        v = self.model_config.get("vision_cfg", {})
        return f"custom-vit(w{v.get('width')},l{v.get('layers')},p{v.get('patch_size')},{v.get('image_size')}px)"


def load_state_file(path: str) -> dict:
    """Loads a weights file: safetensors, or a torch file with ``weights_only=True`` (never a full pickle)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    log.warning("%s: not safetensors; loading with torch.load(weights_only=True), which refuses "
                "arbitrary pickled objects. Convert it to safetensors to silence this.", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: the file wants more than tensors
        raise ValueError(f"{path}: refused; not a plain tensor file ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def build_clip(cfg: BackboneConfig, load_pretrained: bool = True) -> nn.Module:
    if cfg.model_config is not None:
        return open_clip.model.CLIP(**copy.deepcopy(cfg.model_config))
    if load_pretrained and cfg.pretrained and not cfg.weights_file:
        try:
            return open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained)
        except Exception as e:
            raise RuntimeError(
                f"could not load open_clip weights {cfg.model_name}/{cfg.pretrained}: they must already "
                f"be in the local open_clip/Hugging Face cache (this machine cannot download). Give a "
                f"local weights file instead (backbone.weights_file). Cause: {e}") from e
    return open_clip.create_model(cfg.model_name, pretrained=None)


class Backbone(nn.Module):
    """Wraps an open_clip CLIP model; ``forward(images) -> (embedding, patch_tokens)``."""

    def __init__(self, cfg: BackboneConfig, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.clip = build_clip(cfg, load_pretrained)
        self.clip.visual.output_tokens = True
        pp = open_clip.get_model_preprocess_cfg(self.clip)
        self.image_size = pp.get("size", self.clip.visual.image_size)
        if isinstance(self.image_size, (tuple, list)):
            self.image_size = tuple(self.image_size)
        self.preprocess_cfg = pp

    @property
    def width(self) -> int:
        return self.clip.visual.transformer.width

    @property
    def embedding_dim(self) -> int:
        return self.clip.visual.output_dim

    @property
    def num_patches(self) -> int:
        grid = self.clip.visual.grid_size
        return grid[0] * grid[1]

    def image_transform(self):
        """open_clip's own eval transform (resize, centre crop, to tensor, normalise) for PIL images."""
        pp = self.preprocess_cfg
        return open_clip.image_transform(
            self.image_size, is_train=False, mean=pp.get("mean"), std=pp.get("std"),
            resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"),
            fill_color=pp.get("fill_color", 0))

    def forward(self, images: torch.Tensor):
        pooled, tokens = self.clip.visual(images)
        return F.normalize(pooled.float(), dim=-1), tokens

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(token_ids).float(), dim=-1)

    def tokenizer(self):
        if self.cfg.model_name:
            return open_clip.get_tokenizer(self.cfg.model_name)
        ctx = self.cfg.model_config.get("text_cfg", {}).get("context_length", 77)
        return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
