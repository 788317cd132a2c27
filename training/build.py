"""What a run trains, built from its flags: the adapter, the joint encoder and the MLM word tables."""
import torch

from models.adapter import AdapterConfig
from models.joint_encoder import MINILM_PACKAGE, JointEncoderConfig, build_bert, resolve_base_model
from models.mlm import caption_words

WORD_CLASSES = {0: "colour", 1: "shape", 2: "size", 3: "spatial"}
# every word naming an object, masked at once: only the relation words are left to say which
# object is which, so filling them in needs the objects' places (``--mlm_words objects``)
OBJECT_CLASSES = (0, 1, 2)
CLASS_RULES = ("classes", "objects")  # --mlm_words rules that mask by the scenes' word classes


def adapter_config(args, backbone) -> AdapterConfig:
    grid = backbone.clip.visual.grid_size[0] if args.adapter_positions or args.adapter_locality or args.adapter_cells else 0
    return AdapterConfig(num_tokens=args.num_tokens, input_dim=backbone.width, output_dim=args.joint_width or 384,
                         num_heads=max(1, backbone.width // 32), mlp_dim=4 * backbone.width, grid=grid,
                         locality=args.adapter_locality, cells=args.adapter_cells,
                         output_positions=args.adapter_output_positions, output_norm=args.adapter_output_norm)


def frozen_text_layers(args) -> int:
    """How many of the lowest text-only layers stay MiniLM's (a narrow encoder has none of MiniLM's)."""
    if args.joint_width:
        return 0
    return args.text_layers if args.frozen_text_layers is None else args.frozen_text_layers


def joint_encoder_config(args) -> JointEncoderConfig:
    """The first ``--joint_layers`` MiniLM layers, or (``--joint_width``) a narrower BERT of that many
    layers with MiniLM's vocabulary, initialised by ``init_from_minilm``."""
    common = dict(max_text_tokens=args.max_text_tokens, image_positions=args.image_positions,
                  text_layers=args.text_layers)
    if not args.joint_width:
        return JointEncoderConfig(base_model=MINILM_PACKAGE, bert_overrides={"num_hidden_layers": args.joint_layers},
                                  **common)
    from transformers import BertConfig
    base = BertConfig.from_pretrained(str(resolve_base_model(MINILM_PACKAGE)))
    w = args.joint_width
    bert = {"vocab_size": base.vocab_size, "hidden_size": w, "num_hidden_layers": args.joint_layers,
            "num_attention_heads": max(1, w // 32), "intermediate_size": 4 * w,
            "max_position_embeddings": base.max_position_embeddings, "type_vocab_size": base.type_vocab_size,
            "pad_token_id": base.pad_token_id, "layer_norm_eps": base.layer_norm_eps}
    return JointEncoderConfig(base_model=None, tokenizer=MINILM_PACKAGE, bert_overrides=bert, **common)


@torch.no_grad()
def init_from_minilm(bert) -> None:
    """A narrow BERT's word and position embeddings from MiniLM's, projected on the top principal
    directions of MiniLM's word embeddings (words keep their neighbours) and rescaled to BERT's
    initial spread; the layers stay randomly initialised."""
    minilm = build_bert(JointEncoderConfig(bert_overrides={"num_hidden_layers": 1}), load_base_weights=True)
    word = minilm.embeddings.word_embeddings.weight.double()
    position = minilm.embeddings.position_embeddings.weight.double()
    w = bert.config.hidden_size
    mean = word.mean(0)
    basis = torch.linalg.svd(word - mean, full_matrices=False).Vh[:w].t()  # (384, w)
    projected = (word - mean) @ basis
    scale = bert.config.initializer_range / projected.std()
    bert.embeddings.word_embeddings.weight.copy_(projected * scale)
    bert.embeddings.position_embeddings.weight.copy_(((position - position.mean(0)) @ basis) * scale)


POSITION_WORDS = {"columns": (("left",), ("right",)), "rows": (("above", "top"), ("below", "bottom"))}


@torch.no_grad()
def init_position_words(adapter, tokenizer, word_embeddings: torch.Tensor, scale: float = 0.5) -> None:
    """Starts the adapter's row and column embeddings at the joint encoder's own (centred) word
    embeddings of where they are: the left half of the columns "left", the right half "right", the
    upper rows "above"/"top", the lower rows "below"/"bottom" (a middle row or column: the mean);
    times ``scale``. A token then says "red circle, left" in words the language model already reads,
    so a caption's spatial word binds to an object as a colour binds to a shape. Trained from there."""
    centre = word_embeddings.mean(0)

    def meaning(words):
        ids = [i for w in words for i in tokenizer.tok(w, add_special_tokens=False)["input_ids"]]
        return (word_embeddings[ids] - centre).mean(0)
    side = adapter.rows.shape[0]
    for name, (first, second) in POSITION_WORDS.items():
        a, b = meaning(first), meaning(second)
        table = getattr(adapter, name)
        for k in range(side):
            t = (k + 0.5) / side
            share = 1.0 if t < 0.5 else 0.0 if t > 0.5 else 0.5
            table[k] = scale * (share * a + (1 - share) * b).to(table.dtype)


def scene_word_classes(tokenizer, captions):
    """(ids, mask, word class per token (-1: none)) of captions under the scenes' vocabulary."""
    from models.mlm import SPATIAL_WORDS
    from scenes.vocabulary import COLORS, SHAPES, SIZES
    vocab = {**{w: 0 for w in COLORS}, **{w: 1 for w in SHAPES}, **{w: 2 for w in SIZES},
             **{w: 3 for w in SPATIAL_WORDS}}
    ids, mask, words, strings = caption_words(tokenizer, captions, "all")
    cls = torch.full(ids.shape, -1, dtype=torch.long)
    for r, row in enumerate(strings):
        table = torch.tensor([vocab.get(w, -1) for w in row] + [-1], dtype=torch.long)
        cls[r] = table[words[r]]  # word -1 (special, padding) reads the trailing -1
    return ids, mask, cls


def caption_tables(tokenizer, captions, rule: str):
    """(ids, mask, words) for the joint encoder and MLM: maskable word numbers under ``rule``, or
    word classes under the scenes' rules (CLASS_RULES)."""
    if rule in CLASS_RULES:
        return scene_word_classes(tokenizer, captions)
    ids, mask, words, _ = caption_words(tokenizer, captions, rule)
    return ids, mask, words
