"""Checkpoint directories: ``config.json`` + ``model.safetensors``, never a pickle.

The fingerprint (sha256 over the canonical config and the weight bytes) names the exact model
and is recorded in every store built with it.
"""
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file
import torch
from torch import nn

from models.adapter import AdapterConfig, TokenCompressionAdapter
from models.backbone import Backbone, BackboneConfig, load_state_file
from models.joint_encoder import JointEncoder, JointEncoderConfig, Tokenizer, base_weights_sha256, file_sha256
from models.precision import AutocastScorer, require

FORMAT = "edje-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default"


class CheckpointError(ValueError):
    pass


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass
class CheckpointConfig:
    backbone: BackboneConfig
    adapter: AdapterConfig
    joint_encoder: Optional[JointEncoderConfig] = None
    description: str = ""

    def to_dict(self):
        return {"format": FORMAT, "version": VERSION, "description": self.description,
                "backbone": self.backbone.to_dict(), "adapter": self.adapter.to_dict(),
                "joint_encoder": self.joint_encoder.to_dict() if self.joint_encoder else None}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"config.json: format must be {FORMAT!r}")
        if d.get("version") != VERSION:
            raise CheckpointError(f"config.json: unsupported checkpoint version {d.get('version')!r}")
        try:
            joint = d.get("joint_encoder")
            return cls(backbone=BackboneConfig.from_dict(d["backbone"]),
                       adapter=AdapterConfig.from_dict(d["adapter"]),
                       joint_encoder=JointEncoderConfig.from_dict(joint) if joint else None,
                       description=d.get("description", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: {e}") from e


def localize(path):
    """A checkpoint on a remote filesystem (gs://, s3://, ...) is copied once to a local cache."""
    if path is None or "://" not in str(path):
        return path
    from apache_beam.io.filesystems import FileSystems
    url = str(path)
    cache = Path(tempfile.gettempdir()) / "edje-checkpoints" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not (cache / WEIGHTS_FILE).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            tmp = cache / f".{name}.{os.getpid()}"
            with FileSystems.open(FileSystems.join(url, name)) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.replace(tmp, cache / name)
    return cache


def resolve_dir(path) -> Path:
    """The checkpoint directory (local, or copied from a remote URL); ``None`` means the embedded default."""
    path = Path(localize(path)) if path else DEFAULT_CHECKPOINT
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise CheckpointError(f"{path}: pickled checkpoints are refused; a checkpoint is a directory "
                              f"with {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return path


def read_config(path) -> CheckpointConfig:
    path = resolve_dir(path)
    raw = (path / CONFIG_FILE).read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path / CONFIG_FILE}: too large")
    try:
        return CheckpointConfig.from_dict(json.loads(raw))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid JSON ({e})") from e


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r} (cpu, cuda or cuda:N)")
    return device


def fingerprint(path) -> str:
    path = resolve_dir(path)
    cfg = read_config(path)
    h = hashlib.sha256()
    h.update(b"edje-config\0" + canonical_json(cfg.to_dict()))
    h.update(b"\0weights\0" + file_sha256(path / WEIGHTS_FILE).encode())
    if cfg.backbone.weights_file:
        h.update(b"\0backbone\0" + file_sha256(Path(cfg.backbone.weights_file)).encode())
    if cfg.joint_encoder and cfg.joint_encoder.base_model:
        h.update(b"\0joint-base\0" + base_weights_sha256(cfg.joint_encoder.base_model).encode())
    return h.hexdigest()


def embedding_dim(cfg: BackboneConfig) -> int:
    """The pooled embedding width, from the config alone (no model is built)."""
    if cfg.model_config is not None:
        return int(cfg.model_config["embed_dim"])
    import open_clip
    model_cfg = open_clip.get_model_config(cfg.model_name)
    if model_cfg is None:
        raise CheckpointError(f"unknown open_clip model {cfg.model_name!r}")
    return int(model_cfg["embed_dim"])


class VisionEncoder(nn.Module):
    """Backbone + adapter: images -> (adapter tokens (B, m, h), L2-normalised embedding (B, d))."""

    def __init__(self, backbone: Backbone, adapter: TokenCompressionAdapter):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter

    def forward(self, images):
        embedding, patch_tokens = self.backbone(images.to(self.adapter.queries.dtype))  # a bf16 copy takes bf16
        return self.adapter(patch_tokens), embedding


def _split(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_vision_encoder(path=None, device="cpu", precision="fp32"):
    """Loads backbone + adapter from a checkpoint directory. Returns (encoder, config, fingerprint).
    ``precision="int8"``: both in int8 on the CPU (``models.int8.Int8VisionEncoder``); ``"bf16"`` on
    the CPU: both cast to bfloat16 (1.8x fp32's img/s where autocast gave 1.1x: BENCHMARKS.md, "CPU
    precisions"); on a GPU bf16 and fp16 are autocast by the caller (``VisionModelHandler``)."""
    require(precision, device, gpu_precisions=("fp32", "bf16", "fp16"))
    path = resolve_dir(path)
    cfg = read_config(path)
    state = load_file(str(path / WEIGHTS_FILE))
    backbone_state = _split(state, "backbone.clip.")
    # Weights in the checkpoint (or a weights file) win; the pretrained tag is only a fallback.
    backbone = Backbone(cfg.backbone, load_pretrained=not backbone_state and not cfg.backbone.weights_file)
    if not backbone_state and cfg.backbone.weights_file:
        backbone_state = load_state_file(cfg.backbone.weights_file)
    if backbone_state:
        _load_strict(backbone.clip, backbone_state, "backbone")
    elif not cfg.backbone.pretrained:
        raise CheckpointError(f"{path}: no backbone weights (neither backbone.* tensors, a weights_file "
                              f"nor a pretrained tag)")
    adapter = TokenCompressionAdapter(cfg.adapter)
    _load_strict(adapter, _split(state, "adapter."), "adapter")
    if adapter.cfg.input_dim != backbone.width:
        raise CheckpointError(f"adapter input_dim {adapter.cfg.input_dim} != backbone width {backbone.width}")
    encoder = VisionEncoder(backbone, adapter).to(device).eval().float()
    for p in encoder.parameters():
        p.requires_grad_(False)
    fp = fingerprint(path)
    if precision == "bf16" and device == "cpu":
        encoder = encoder.to(torch.bfloat16)
    if precision == "int8":
        from models.int8 import Int8VisionEncoder
        encoder = Int8VisionEncoder(encoder, fp, torch.get_num_threads())
    return encoder, cfg, fp


def load_joint_encoder(path=None, device="cpu"):
    """Loads the joint encoder and its tokenizer. Returns (model, tokenizer, config, fingerprint).

    Base weights (e.g. the offline MiniLM) load first; every ``joint.*`` tensor of the checkpoint
    then replaces its counterpart, and whatever the base lacks (pooler, head) must be there.
    """
    path = resolve_dir(path)
    cfg = read_config(path)
    if cfg.joint_encoder is None:
        raise CheckpointError(f"{path}: this checkpoint has no joint encoder (config.json joint_encoder is null)")
    model = JointEncoder(cfg.joint_encoder, load_base_weights=True)
    state = _split(load_file(str(path / WEIGHTS_FILE)), "joint.")
    need = {f"bert.{k}" for k in model.bert.base_missing_keys} | {k for k in model.state_dict() if k.startswith("head.")}
    _load_checked(model, state, need, "joint encoder")
    if cfg.adapter.output_dim != model.hidden_size:
        raise CheckpointError(f"adapter output_dim {cfg.adapter.output_dim} != joint encoder width "
                              f"{model.hidden_size}")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, Tokenizer(cfg.joint_encoder), cfg, fingerprint(path)


def load_scorer(path=None, device="cpu", precision="fp32"):
    """``load_joint_encoder`` for inference: the same logits (within float rounding) from
    ``FastScorer``, the joint encoder in fused blocks (1.2-1.35x on a CPU, 1.12x eager / 1.33x
    compiled on an H200; BENCHMARKS.md). ``precision="int8"``: its per-pair layers in int8 on the
    CPU (``models.int8``, with torch's current thread count); ``"bf16"``: under bf16 autocast
    (``models.precision.AutocastScorer``). Returns (scorer, tokenizer, config, fingerprint)."""
    from models.fast_scorer import FastScorer
    require(precision, device, gpu_precisions=("fp32", "bf16"))
    joint, tokenizer, cfg, fp = load_joint_encoder(path, "cpu")
    scorer = FastScorer.from_joint_encoder(joint).to(device)
    for p in scorer.parameters():
        p.requires_grad_(False)
    if precision == "int8":
        from models.int8 import Int8JointScorer
        scorer = Int8JointScorer(scorer, fp, torch.get_num_threads())
    elif precision == "bf16":
        scorer = AutocastScorer(scorer)
    return scorer, tokenizer, cfg, fp


def _load_checked(module, state, required, what):
    """Loads ``state`` into ``module``: every ``required`` key present, no unknown key, shapes equal."""
    own = module.state_dict()
    missing = sorted(set(required) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{what} weights do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {shapes[:5]}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def _load_strict(module, state, what):
    _load_checked(module, state, module.state_dict().keys(), what)


def save_checkpoint(path, cfg: CheckpointConfig, modules: dict, dtype=None) -> str:
    """Writes ``config.json`` + ``model.safetensors``; ``modules`` maps a key prefix to a module
    or to a dict of tensors (to store only part of a module, e.g. what a base model lacks)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for prefix, module in modules.items():
        tensors = module if isinstance(module, dict) else module.state_dict()
        for k, v in tensors.items():
            v = v.detach().cpu().contiguous()
            state[f"{prefix}.{k}"] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path / WEIGHTS_FILE)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path / CONFIG_FILE)  # (a reader never sees half a config)
    return fingerprint(path)


def load_backbone(path, device="cpu") -> Backbone:
    """The frozen backbone of a checkpoint directory, for training an adapter and joint encoder on
    it: a whole checkpoint, or a ``config.json`` whose ``backbone`` section is all there is (then
    ``model.safetensors`` is optional: the weights may come from ``weights_file`` or the
    ``pretrained`` tag). Refused, with the reason, unless it has weights and gives patch tokens."""
    local = Path(localize(path))
    config = local / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (a backbone checkpoint is a directory with one)")
    try:
        raw = json.loads(config.read_bytes()[:MAX_CONFIG_BYTES])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config}: invalid JSON ({e})") from e
    if raw.get("adapter") is not None:
        encoder, _, _ = load_vision_encoder(local, device)  # (builds the same modules in the same order as ever)
        backbone = encoder.backbone
    else:
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise CheckpointError(f"{config}: format must be {FORMAT!r}, version {VERSION}")
        try:
            cfg = BackboneConfig.from_dict(raw.get("backbone") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config}: backbone: {e}") from e
        state = _split(load_file(str(local / WEIGHTS_FILE)), "backbone.clip.") if (local / WEIGHTS_FILE).is_file() else {}
        if not state and cfg.weights_file:
            state = load_state_file(cfg.weights_file)
        if not state and not cfg.pretrained:
            raise CheckpointError(f"{path}: no backbone weights (neither backbone.clip.* tensors, a weights_file "
                                  f"nor a pretrained tag)")
        backbone = Backbone(cfg, load_pretrained=not state)
        if state:
            _load_strict(backbone.clip, state, "backbone")
        backbone = backbone.to(device).eval().float()
        for p in backbone.parameters():
            p.requires_grad_(False)
    _check_patch_tokens(backbone, path, device)
    return backbone


def _check_patch_tokens(backbone: Backbone, path, device) -> None:
    import torch
    size = backbone.image_size if isinstance(backbone.image_size, tuple) else (backbone.image_size,) * 2
    try:
        with torch.no_grad():
            _, tokens = backbone(torch.zeros(1, 3, *size, device=device))
    except Exception as e:
        raise CheckpointError(f"{path}: the backbone does not give patch tokens ({type(e).__name__}: {e})") from e
    if tokens is None or tokens.dim() != 3:
        raise CheckpointError(f"{path}: the backbone does not give patch tokens (a ViT's (n, d) per image)")
