"""FastScorer gives JointEncoder's logits (real MiniLM weights, 2 layers, CPU)."""
import numpy as np
import pytest
import torch

from models.fast_scorer import FastScorer
from models.joint_encoder import JointEncoder, JointEncoderConfig
from schemas.quantization import dequantize_int8, quantize_int8


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    joint = JointEncoder(JointEncoderConfig(bert_overrides={"num_hidden_layers": 2})).eval()
    # random pooler (MiniLM has none) and head, large enough that pairs score differently
    torch.nn.init.normal_(joint.bert.pooler.dense.weight, std=0.05)
    torch.nn.init.normal_(joint.head.weight, std=0.5)
    return joint, FastScorer.from_joint_encoder(joint)


def batch(b=6, t=12, m=5, h=384, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 3, 7, 12, 2, 9][:b])  # different text lengths, incl. [CLS] [SEP]
    ids = torch.randint(1000, 30000, (b, t), generator=g)
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = ids * mask  # [PAD] = 0 after the text
    return ids, mask, torch.randn(b, m, h, generator=g)


@torch.no_grad()
def test_fp32_logits_equal_joint_encoder(models):
    joint, fast = models
    ids, mask, tokens = batch()
    expected = joint(ids, mask, tokens)
    got = fast(ids, mask, tokens)
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert expected.max() - expected.min() > 0.01  # 100x the tolerance: pairs score differently
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@torch.no_grad()
def test_int8_entry_equals_joint_encoder_on_dequantized_tokens(models):
    joint, fast = models
    ids, mask, tokens = batch(seed=2)
    q, scales = quantize_int8(tokens.numpy())
    expected = joint(ids, mask, torch.from_numpy(dequantize_int8(q, scales)))
    got = fast.forward_int8(ids, mask, torch.from_numpy(q), torch.from_numpy(scales))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@torch.no_grad()
def test_pair_score_does_not_depend_on_the_batch(models):
    _, fast = models
    ids, mask, tokens = batch(seed=3)
    full = fast(ids, mask, tokens)
    for i in (1, 4):  # short texts: alone they are padded less (or not at all)
        t = int(mask[i].sum())
        alone = fast(ids[i:i + 1, :t], mask[i:i + 1, :t], tokens[i:i + 1])
        torch.testing.assert_close(alone, full[i:i + 1], atol=2e-5, rtol=0)
    other = batch(seed=4)  # same pair 0, different companions
    mixed = fast(torch.cat([ids[:1], other[0][1:]]), torch.cat([mask[:1], other[1][1:]]),
                 torch.cat([tokens[:1], other[2][1:]]))
    torch.testing.assert_close(mixed[0], full[0], atol=2e-5, rtol=0)


@torch.no_grad()
def test_bf16_close_to_fp32(models):
    _, fast = models
    ids, mask, tokens = batch(seed=5)
    expected = fast(ids, mask, tokens)
    low = FastScorer.from_joint_encoder(models[0]).to(torch.bfloat16)
    got = low(ids, mask, tokens)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=0.1)


@torch.no_grad()
def test_fixed_image_positions(models):
    """image_positions="fixed": both scorers agree, scores stay batch-independent, and the image
    tokens' position ids no longer follow the text length (so the logits change)."""
    base, _ = models
    cfg = JointEncoderConfig(bert_overrides={"num_hidden_layers": 2}, max_text_tokens=12, image_positions="fixed")
    joint = JointEncoder(cfg).eval()
    joint.load_state_dict(base.state_dict())
    fast = FastScorer.from_joint_encoder(joint)
    ids, mask, tokens = batch(seed=6)
    expected = joint(ids, mask, tokens)
    torch.testing.assert_close(fast(ids, mask, tokens), expected, atol=2e-5, rtol=0)
    t = int(mask[1].sum())
    torch.testing.assert_close(joint(ids[1:2, :t], mask[1:2, :t], tokens[1:2]), expected[1:2], atol=2e-5, rtol=0)
    moved = (expected - base(ids, mask, tokens)).abs()
    full = mask.sum(1) == 12  # a text of max_text_tokens tokens: the same ids either way
    assert (moved[full] < 2e-5).all() and (moved[~full] > 2e-4).all()
    # the option is written only when set: existing checkpoints keep their fingerprint
    assert "image_positions" not in JointEncoderConfig().to_dict()
    assert JointEncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="image_positions"):
        JointEncoderConfig(image_positions="sideways")


def text_layer_models(base):
    """``base``'s weights with text_layers=1: (JointEncoder, FastScorer)."""
    joint = JointEncoder(JointEncoderConfig(bert_overrides={"num_hidden_layers": 2}, text_layers=1)).eval()
    joint.load_state_dict(base.state_dict())
    return joint, FastScorer.from_joint_encoder(joint)


@torch.no_grad()
def test_text_only_lower_layers(models):
    """text_layers=1: the lower layer is MiniLM on the text alone, the image joins above it; both
    scorers agree, with and without text_index, and a pair's score depends on its own text and image only."""
    base, _ = models
    joint, fast = text_layer_models(base)
    ids, mask, tokens = batch(seed=7)
    expected = joint(ids, mask, tokens)
    assert expected.max() - expected.min() > 0.01
    torch.testing.assert_close(fast(ids, mask, tokens), expected, atol=2e-5, rtol=0)
    # the lower layer's states are plain MiniLM on the text
    hf = joint.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    keep = mask.bool()
    torch.testing.assert_close(joint.encode_text(ids, mask)[keep], hf[keep], atol=2e-5, rtol=0)
    # every text against every image through text_index: texts encoded once, the same logits
    index = torch.arange(6).repeat_interleave(6)
    grid = fast(ids, mask, tokens.repeat(6, 1, 1), text_index=index)
    torch.testing.assert_close(grid.view(6, 6).diagonal(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(joint(ids, mask, tokens.repeat(6, 1, 1), text_index=index), grid, atol=2e-5, rtol=0)
    assert (grid.view(6, 6).std(0) > 1e-3).all() and (grid.view(6, 6).std(1) > 1e-3).all()
    t = int(mask[1].sum())
    torch.testing.assert_close(fast(ids[1:2, :t], mask[1:2, :t], tokens[1:2]), expected[1:2], atol=2e-5, rtol=0)
    assert "text_layers" not in JointEncoderConfig().to_dict()
    assert JointEncoderConfig.from_dict(joint.cfg.to_dict()) == joint.cfg
    with pytest.raises(ValueError, match="text_layers"):
        JointEncoder(JointEncoderConfig(bert_overrides={"num_hidden_layers": 2}, text_layers=2))


def test_text_states_are_kept_and_never_stale(models):
    """Without autograd a text's lower-layer states are kept: the second batch's logits are the
    first's, bit for bit, and the text layers do not run again; moving the weights (bf16) or loading
    others empties the cache; with autograd nothing is kept; a copy starts empty and works."""
    import copy
    from models import fast_scorer
    base, _ = models
    joint, fast = text_layer_models(base)
    ids, mask, tokens = batch(seed=8)
    calls = []
    hook = fast.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        first = fast(ids, mask, tokens)
        assert len(calls) == 6 and len(fast._text_cache) == 6
        again = fast(ids, mask, tokens.flip(0))  # same texts, other images
        assert len(calls) == 6
        torch.testing.assert_close(again, fast(ids, mask, tokens.flip(0)), atol=0, rtol=0)
        torch.testing.assert_close(fast(ids, mask, tokens), first, atol=0, rtol=0)
        fast.to(torch.bfloat16)
        assert not fast._text_cache
        low = fast(ids, mask, tokens)
        assert len(calls) == 12 and not torch.equal(low, first)
        fast.to(torch.float32)
        other = {k: v + 0.05 * torch.randn_like(v) if k.startswith("layers.0.") else v
                 for k, v in fast.state_dict().items()}
        fast.load_state_dict(other)  # another text layer
        assert not fast._text_cache
        moved = fast(ids, mask, tokens)
        assert (moved - first).abs().max() > 1e-4  # the other text layer, not the kept states
        clone = copy.deepcopy(fast)
        assert not clone._text_cache
        torch.testing.assert_close(clone(ids, mask, tokens), moved, atol=0, rtol=0)
    hook.remove()
    n = len(fast._text_cache)
    fast(ids[:, :5], mask[:, :5], tokens).sum().backward()
    assert len(fast._text_cache) == n
    old = fast_scorer.TEXT_CACHE
    try:
        fast_scorer.TEXT_CACHE = 2
        with torch.no_grad():
            fast(*batch(seed=9))
        assert len(fast._text_cache) == 2  # least recently used texts are dropped
    finally:
        fast_scorer.TEXT_CACHE = old
