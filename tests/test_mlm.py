"""Grounded MLM: which caption words each rule may mask (real MiniLM tokenizer), the grounding report."""
import torch

from models.joint_encoder import JointEncoder, JointEncoderConfig, Tokenizer
from models.losses import MaskedLMHead
from models.mlm import STOP_WORDS, Mlm, caption_words, grounding_report

CAPTIONS = ["a red circle to the left of a cyan square", "on the left a large purple star, on the right a small diamond"]


def masked_words(rule):
    tok = Tokenizer(JointEncoderConfig(max_text_tokens=32))
    ids, mask, words, strings = caption_words(tok, CAPTIONS, rule)
    assert torch.equal(ids, tok(CAPTIONS)[0]) and torch.equal(mask, tok(CAPTIONS)[1])  # same as scoring
    out = []
    for r in range(len(CAPTIONS)):
        out.append(sorted({strings[r][w] for w in words[r].tolist() if w >= 0}))
        assert (words[r][mask[r] == 0] == -1).all() and words[r][0] == -1  # padding, [CLS] never masked
    return out


def test_word_rules_content_and_spatial():
    content = masked_words("content")
    assert content[0] == ["circle", "cyan", "left", "red", "square"]
    assert not set(content[1]) & STOP_WORDS and {"large", "purple", "right", "diamond"} <= set(content[1])
    assert masked_words("spatial") == [["left"], ["left", "right"]]
    assert "a" in masked_words("all")[0]


def test_grounding_report_per_class_and_image_condition():
    torch.manual_seed(0)
    cfg = JointEncoderConfig(bert_overrides={"num_hidden_layers": 1}, max_text_tokens=32)
    joint = JointEncoder(cfg).eval()
    tok = Tokenizer(cfg)
    ids, mask, words, strings = caption_words(tok, CAPTIONS, "all")
    colour = torch.tensor([[int(strings[r][w] in ("red", "cyan", "purple")) - 1 if w >= 0 else -1
                            for w in words[r].tolist()] for r in range(2)])  # class 0 = colour words
    mlm = Mlm(MaskedLMHead(joint.bert.embeddings.word_embeddings), tok.tok.mask_token_id, 1.0, 0.5)
    tokens = torch.randn(2, 4, 384)
    report = grounding_report(mlm, joint, ids, mask, colour, tokens, tokens.roll(1, 0), {0: "colour", 1: "none"})
    assert set(report) == {"colour"} and set(report["colour"]) == {"own", "other", "none"}
    assert all(0 <= v <= 100 for v in report["colour"].values())
    loss = mlm.loss(joint, ids, mask, words, tokens, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
