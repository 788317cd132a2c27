"""A faster scoring path with the same math as ``JointEncoder`` (inference only).

``JointEncoder`` goes through HF ``BertModel``: three separate Q/K/V projections, mask building
and many small ops per layer. ``FastScorer`` holds the same weights in plain blocks: one fused
QKV ``Linear`` per layer, ``scaled_dot_product_attention`` with a boolean key-padding mask, and
the packed ``[CLS] text [SEP] <img> x m [SEP]`` input built with a single gather, and a last
layer that finishes only the [CLS] row (the only one the pooler reads). It is post-LN
BERT exactly (LayerNorm eps and activation from the BERT config), so its logits equal
``JointEncoder``'s up to float rounding, and it compiles cleanly with ``torch.compile``.

With ``text_layers`` (``JointEncoderConfig``) the lower layers run on the text alone, once per
distinct text of the batch (``text_index``), and the image tokens join above them.

bf16: cast the module (``FastScorer.from_joint_encoder(j).to(device, torch.bfloat16)``); inputs
are cast to the weights' dtype and logits come back float32.
"""
import threading
from collections import OrderedDict
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.joint_encoder import image_position_ids

# HF's names for the activations BERT configs use (transformers.activations.ACT2FN):
# "gelu" is the exact erf GELU; "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation.
TEXT_CACHE = 1024  # texts whose lower-layer states a scorer keeps (<= 48 KB each at 32 tokens x 384)
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu}


class _Layer(nn.Module):
    """One post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)  # one GEMM instead of three
        self.out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor, keep: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if cls_only:  # after the last layer only [CLS] is read: its row alone needs the rest
            q, x = q[:, :, :1], x[:, :1]
        # keep: (B, 1, 1, n) bool, True = real key; the default scale 1/sqrt(head_dim) is BERT's
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = self.ln1(x + self.out(a.transpose(1, 2).reshape(b, x.shape[1], h)))
        return self.ln2(x + self.fc2(self.act(self.fc1(x))))


class FastScorer(nn.Module):
    def __init__(self, bert_config):
        super().__init__()
        c = bert_config
        if getattr(c, "position_embedding_type", "absolute") != "absolute" or getattr(c, "is_decoder", False):
            raise ValueError("FastScorer supports encoder BERT with absolute positions only")
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"FastScorer: unsupported activation {c.hidden_act!r}")
        h = c.hidden_size
        self.word = nn.Embedding(c.vocab_size, h)
        self.position = nn.Embedding(c.max_position_embeddings, h)
        self.token_type = nn.Embedding(c.type_vocab_size, h)
        self.ln = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(
            _Layer(h, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps, ACTIVATIONS[c.hidden_act])
            for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(h, h)
        self.head = nn.Linear(h, 1)
        self.hidden_act = c.hidden_act
        self.sep_id = c.sep_token_id if getattr(c, "sep_token_id", None) is not None else 102
        self.joint_cfg = None  # the JointEncoderConfig (image position ids); set by from_joint_encoder
        self._text_cache = OrderedDict()  # _text_states; emptied whenever the weights move or load
        self._text_lock = threading.Lock()  # Beam threads may share one scorer

    @classmethod
    @torch.no_grad()
    def from_joint_encoder(cls, joint) -> "FastScorer":
        """A copy of ``joint``'s weights (fp32, on the CPU); ``joint`` is left untouched. Built on
        the meta device and then given every tensor (strict): no time on a random init."""
        bert = joint.bert
        e = bert.embeddings
        state = {}

        def take(prefix, module):
            state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})

        take("word", e.word_embeddings), take("position", e.position_embeddings)
        take("token_type", e.token_type_embeddings), take("ln", e.LayerNorm)
        for i, src in enumerate(bert.encoder.layer):
            s = src.attention.self
            state[f"layers.{i}.qkv.weight"] = torch.cat([s.query.weight, s.key.weight, s.value.weight])
            state[f"layers.{i}.qkv.bias"] = torch.cat([s.query.bias, s.key.bias, s.value.bias])
            take(f"layers.{i}.out", src.attention.output.dense), take(f"layers.{i}.ln1", src.attention.output.LayerNorm)
            take(f"layers.{i}.fc1", src.intermediate.dense), take(f"layers.{i}.fc2", src.output.dense)
            take(f"layers.{i}.ln2", src.output.LayerNorm)
        take("pooler", bert.pooler.dense), take("head", joint.head)
        with torch.device("meta"):
            fast = cls(bert.config)
        fast.load_state_dict({k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()},
                             strict=True, assign=True)
        fast.joint_cfg = joint.cfg
        return fast.eval()

    @property
    def first_joint_layer(self) -> int:
        """Index of the first layer that reads the image tokens (``text_layers``, else 0)."""
        return self.joint_cfg.text_layers if self.joint_cfg is not None and self.joint_cfg.text_layers else 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_tokens: torch.Tensor, text_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids/attention_mask: (B, T) ``[CLS] text [SEP]`` right-padded; image_tokens (B, m, h).
        Returns logits (B,) float32, equal to ``JointEncoder.forward`` on the same inputs (and the
        same ``text_index``: pair i reads text ``text_index[i]``)."""
        return self.joint(*self.joint_input(input_ids, attention_mask, image_tokens, text_index))

    def joint_input(self, input_ids, attention_mask, image_tokens, text_index=None):
        """Everything before the joint layers: -> (x (B, n, h), keep (B, n) bool, True = a real key).
        The int8 path (``models.int8``) runs the joint layers elsewhere from this same input."""
        if self.first_joint_layer:
            return self._split_input(input_ids, attention_mask, image_tokens, text_index)
        if text_index is not None:
            input_ids, attention_mask = input_ids[text_index], attention_mask[text_index]
        b, t = input_ids.shape
        m, h = image_tokens.shape[1], image_tokens.shape[2]
        n = t + m + 1
        text_len = attention_mask.sum(1, keepdim=True)  # (B, 1) incl. [CLS] and [SEP]
        rel = torch.arange(n, device=input_ids.device)[None] - text_len  # (B, n): < 0 on text
        # Row i of the packed sequence reads from cat([text (t), image (m), [SEP] (1)]); the
        # padding after the closing [SEP] reads [SEP] too: it is masked out as a key and is never
        # [CLS], so it cannot change the logit.
        src = torch.where(rel < 0, rel + text_len, t + rel.clamp(max=m))
        sep = self.word.weight[self.sep_id].expand(b, 1, h)
        x = torch.cat([self.word(input_ids), image_tokens.to(sep.dtype), sep], 1)
        x = torch.gather(x, 1, src[..., None].expand(-1, -1, h))
        if self.joint_cfg is None or self.joint_cfg.image_positions == "after_text":
            position = self.position.weight[:n]
        else:
            pos = torch.arange(n, device=input_ids.device)[None].expand(b, -1)
            position = self.position(image_position_ids(pos, text_len[:, 0], self.joint_cfg))
        x = x + self.token_type((rel >= 0).long()) + position  # HF's order; type 1: image, [SEP]
        return self.ln(x), rel <= m  # keys: text, image tokens and the closing [SEP]

    def _split_input(self, input_ids, attention_mask, image_tokens, text_index):
        """Text-only lower layers once per text, then text states + image tokens (JointEncoder's split)."""
        # each text alone: a GEMM's rounding for one text may depend on how many rows share it; so a
        # text's states are the same in every batch, and can be kept for its next batch
        x = torch.cat([self._text_states(input_ids[u:u + 1], attention_mask[u:u + 1]) for u in range(len(input_ids))])
        if text_index is not None:
            x, attention_mask = x[text_index], attention_mask[text_index]
        x = torch.cat([x, image_tokens.to(x.dtype)], 1)
        keep = torch.cat([attention_mask.bool(), attention_mask.new_ones(image_tokens.shape[:2], dtype=torch.bool)], 1)
        return x, keep

    def _text_states(self, input_ids, attention_mask):
        """(1, T, h) states of one text after the text-only layers. Without autograd the last
        TEXT_CACHE texts' states are kept: the rerank job scores a query's candidates shard by shard,
        and each shard's batches would otherwise run its text again (4 shards, 20 candidates a
        query: 84 text passes for 20 texts, 45% of the scoring time on the demo checkpoint)."""
        device = input_ids.device.type
        key = None
        if not torch.is_grad_enabled():
            autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            key = (input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes(), autocast,
                   self.word.weight.dtype, str(input_ids.device))
            with self._text_lock:
                if key in self._text_cache:
                    self._text_cache.move_to_end(key)
                    return self._text_cache[key]
        t = input_ids.shape[1]
        x = self.ln(self.word(input_ids) + self.token_type(torch.zeros_like(input_ids)) + self.position.weight[:t])
        keep = attention_mask.bool()[:, None, None, :]
        for layer in self.layers[:self.first_joint_layer]:
            x = layer(x, keep)
        if key is not None:
            with self._text_lock:
                self._text_cache[key] = x
                while len(self._text_cache) > TEXT_CACHE:
                    self._text_cache.popitem(last=False)
        return x

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda() ...: cached states are stale
        self._text_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # deepcopy / pickle: a lock does not copy, and the cache need not
        state = super().__getstate__()
        state.update(_text_cache=OrderedDict(), _text_lock=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._text_lock = threading.Lock()

    def _load_from_state_dict(self, *args, **kwargs):
        self._text_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def joint(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The joint layers, pooler and head on ``joint_input``'s output -> logits (B,) float32."""
        keep = keep[:, None, None, :]
        top = self.layers[self.first_joint_layer:]
        for i, layer in enumerate(top):
            x = layer(x, keep, cls_only=i == len(top) - 1)
        return self.head(torch.tanh(self.pooler(x[:, 0]))).squeeze(-1).float()

    def prepare_int8(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     tokens_int8: torch.Tensor, scales: torch.Tensor):
        """The store's format, int8 tokens (B, m, h) + float32 scales (B, m), usually on the host,
        -> ``forward``'s arguments on the module's device.

        Copies the int8 bytes (4x fewer than float32 tokens), from pinned memory without blocking
        the host, and dequantizes on the device exactly like ``schemas.quantization.dequantize_int8``
        (a float32 product). Pin the host tensors once (the loader's job) to avoid a copy here."""
        device = self.word.weight.device
        pin = device.type == "cuda"

        def move(x):
            if pin and x.device.type == "cpu" and not x.is_pinned():
                x = x.pin_memory()
            return x.to(device, non_blocking=True)

        input_ids, attention_mask, tokens_int8, scales = map(move, (input_ids, attention_mask, tokens_int8, scales))
        return input_ids, attention_mask, tokens_int8.float() * scales.float()[..., None]

    def forward_int8(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     tokens_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Logits (B,) from the store's int8 tokens + scales (see ``prepare_int8``)."""
        return self(*self.prepare_int8(input_ids, attention_mask, tokens_int8, scales))
