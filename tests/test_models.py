import dataclasses
import json
import logging

import numpy as np

import pytest
import torch

from models.adapter import AdapterConfig, TokenCompressionAdapter
from models.backbone import Backbone, BackboneConfig, load_state_file
from models.checkpoint import (CheckpointConfig, CheckpointError, DEFAULT_CHECKPOINT, fingerprint,
                               load_joint_encoder, load_vision_encoder, resolve_dir, save_checkpoint)
from models.joint_encoder import score_batch
from models.joint_encoder import MINILM_PACKAGE, JointEncoder, JointEncoderConfig
from models.make_default import TINY_CLIP

SMALL_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


SMALL_BERT = {"vocab_size": 30522, "hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 96, "max_position_embeddings": 128}


def small_checkpoint(path, seed=0, num_tokens=4):
    """A complete tiny checkpoint: open_clip ViT, adapter, and a fresh 1-layer BERT joint encoder."""
    torch.manual_seed(seed)
    cfg = CheckpointConfig(BackboneConfig(model_config=SMALL_CLIP),
                           AdapterConfig(num_tokens=num_tokens, input_dim=64, output_dim=48, num_heads=2, mlp_dim=128),
                           JointEncoderConfig(base_model=None, bert_overrides=SMALL_BERT, tokenizer=MINILM_PACKAGE,
                                              max_text_tokens=16))
    backbone, adapter = Backbone(cfg.backbone), TokenCompressionAdapter(cfg.adapter)
    joint = JointEncoder(cfg.joint_encoder)
    fp = save_checkpoint(path, cfg, {"backbone": backbone, "adapter": adapter, "joint": joint})
    return cfg, backbone, adapter, fp


def test_adapter_compresses_patch_tokens_to_m_tokens_of_joint_width():
    adapter = TokenCompressionAdapter(AdapterConfig(num_tokens=8, input_dim=64, output_dim=48, num_heads=4, mlp_dim=96))
    out = adapter(torch.randn(3, 49, 64))
    assert out.shape == (3, 8, 48)
    # Separate key/value projections feed the cross-attention, and the output depends on the input.
    assert adapter.key.weight.shape == adapter.value.weight.shape == (64, 64)
    assert not torch.allclose(adapter(torch.randn(1, 49, 64)), adapter(torch.randn(1, 49, 64)))
    with pytest.raises(ValueError):
        TokenCompressionAdapter(AdapterConfig(input_dim=65, num_heads=4))


def test_backbone_returns_normalised_embedding_and_all_patch_tokens():
    bb = Backbone(BackboneConfig(model_config=TINY_CLIP)).eval()
    emb, tokens = bb(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert tokens.shape == (2, bb.num_patches, bb.width) == (2, 64, 128)
    transform = bb.image_transform()
    from PIL import Image
    assert transform(Image.new("RGB", (100, 80))).shape == (3, 64, 64)


def test_checkpoint_round_trip_and_fingerprint(tmp_path):
    cfg, backbone, adapter, fp = small_checkpoint(tmp_path / "a")
    encoder, loaded_cfg, loaded_fp = load_vision_encoder(tmp_path / "a")
    assert loaded_fp == fp == fingerprint(tmp_path / "a")
    assert loaded_cfg.to_dict() == cfg.to_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = adapter.eval()(backbone.eval()(x)[1])
        got, emb = encoder(x)
    assert torch.allclose(got, want, atol=1e-5)  # same weights; MHA fast path may reorder float ops
    # Same config, other weights -> other fingerprint; identical rewrite -> same fingerprint.
    assert small_checkpoint(tmp_path / "b", seed=1)[3] != fp
    assert small_checkpoint(tmp_path / "c", seed=0)[3] == fp
    # Hashes are cached per file version: rewriting "a" in place with other weights is seen.
    assert small_checkpoint(tmp_path / "a", seed=1)[3] == fingerprint(tmp_path / "a") != fp


def test_checkpoint_rejects_pickles_and_mismatched_weights(tmp_path):
    with pytest.raises(CheckpointError, match="pickled"):
        resolve_dir(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_dir(tmp_path)
    small_checkpoint(tmp_path / "a", num_tokens=4)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["adapter"]["mlp_dim"] = 64
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="adapter weights do not match"):
        load_vision_encoder(tmp_path / "a")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_torch_weight_files_load_only_tensors(tmp_path, caplog):
    ok = tmp_path / "ok.pt"
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, ok)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_state_file(str(ok))["w"], torch.ones(2))
    assert "weights_only" in caplog.text
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, evil)
    with pytest.raises(ValueError, match="refused"):
        load_state_file(str(evil))


def test_embedded_default_checkpoint_loads_offline():
    encoder, cfg, fp = load_vision_encoder(None)
    assert resolve_dir(None) == DEFAULT_CHECKPOINT
    # the trained demo checkpoint (scripts/train_demo_cpu.sh): text-only lower layers, fused with the first stage
    assert "trained" in cfg.description and cfg.joint_encoder.text_layers == 4 and cfg.joint_encoder.fusion_weight > 0
    tokens, emb = encoder(torch.zeros(1, 3, 64, 64))
    assert tokens.shape == (1, cfg.adapter.num_tokens, cfg.adapter.output_dim) and len(fp) == 64


def test_joint_encoder_from_config_round_trips_and_scores_independently_of_batch(tmp_path):
    small_checkpoint(tmp_path / "a")
    model, tokenizer, cfg, fp = load_joint_encoder(tmp_path / "a")
    assert model.hidden_size == cfg.adapter.output_dim == 48 and fp == fingerprint(tmp_path / "a")
    tokens = np.random.default_rng(0).standard_normal((3, 4, 48)).astype(np.float32)
    texts = ["short", "a much longer text than the others, cut at sixteen tokens by the cap", "mid length text"]
    together = score_batch(model, tokenizer, texts, tokens)
    alone = [score_batch(model, tokenizer, [t], tokens[i:i + 1])[0] for i, t in enumerate(texts)]
    assert np.allclose(together, alone, atol=1e-6)
    assert len(tokenizer(["word " * 100])[0][0]) == 16


def test_default_joint_encoder_is_minilm_with_stored_head():
    model, tokenizer, cfg, _ = load_joint_encoder(None)
    assert cfg.joint_encoder.base_model == MINILM_PACKAGE and model.bert.config.num_hidden_layers == 6
    ids, mask = tokenizer(["a red circle"])
    logit = model(ids, mask, torch.zeros(1, cfg.adapter.num_tokens, 384))
    assert logit.shape == (1,) and torch.isfinite(logit).all()


def test_adapter_is_blind_to_patch_order_unless_given_positions():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    perm = torch.randperm(16)
    plain = TokenCompressionAdapter(AdapterConfig(num_tokens=4, input_dim=64, output_dim=32, num_heads=4, mlp_dim=64)).eval()
    with torch.no_grad():
        plain.queries.mul_(50)
        assert torch.allclose(plain(x), plain(x[:, perm]), atol=1e-5)
        placed = TokenCompressionAdapter(AdapterConfig(num_tokens=4, input_dim=64, output_dim=32, num_heads=4,
                                                       mlp_dim=64, grid=4)).eval()
        placed.queries.mul_(50)  # trained queries attend selectively; at init they nearly average
        assert not torch.allclose(placed(x), placed(x[:, perm]), atol=1e-2)
    assert "positions" not in placed.state_dict()  # fixed codes: nothing stored in checkpoints


def test_adapter_locality_starts_each_query_on_its_own_cell_and_round_trips():
    torch.manual_seed(0)
    cfg = AdapterConfig(num_tokens=4, input_dim=64, output_dim=32, num_heads=4, mlp_dim=64, grid=4, locality=0.5)
    adapter = TokenCompressionAdapter(cfg).eval()
    # Query k of the 2x2 layout reads the 2x2 block of patches in its quadrant; mark one quadrant.
    x = torch.zeros(1, 16, 64)
    top_left = [0, 1, 4, 5]
    x[0, top_left] = 5.0
    with torch.no_grad():
        out = adapter(x)
    changed = (out - adapter(torch.zeros(1, 16, 64))).norm(dim=-1)[0]
    assert changed.argmax().item() == 0 and changed[0] > 3 * changed[3]
    assert cfg.to_dict()["locality"] == 0.5 and AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert "locality" not in AdapterConfig(grid=4).to_dict()  # older checkpoints keep their fingerprint
    assert adapter.state_dict()["attention_bias"].shape == (4, 16)  # learnable: stored in checkpoints
    with pytest.raises(ValueError):
        AdapterConfig(num_tokens=8, grid=4, locality=0.5)


def test_adapter_cells_read_only_their_own_cell_and_output_positions_are_shared_by_rows_and_columns():
    torch.manual_seed(0)
    cfg = AdapterConfig(num_tokens=4, input_dim=64, output_dim=32, num_heads=4, mlp_dim=64, grid=4, cells=True,
                        output_positions=True, output_norm=0.05)
    adapter = TokenCompressionAdapter(cfg).eval()
    x = torch.randn(1, 16, 64)
    y = x.clone()
    y[0, [10, 11, 14, 15]] += 3.0  # the bottom-right quadrant only
    with torch.no_grad():
        a, b = adapter(x), adapter(y)
        assert torch.allclose(a[0, :3], b[0, :3], atol=1e-6) and not torch.allclose(a[0, 3], b[0, 3], atol=1e-3)
        # token (r, c) gets rows[r] + columns[c] on top of what the same adapter without them gives
        bare = TokenCompressionAdapter(dataclasses.replace(cfg, output_positions=False)).eval()
        bare.load_state_dict({k: v for k, v in adapter.state_dict().items() if k not in ("rows", "columns")})
        pos = (adapter(x) - bare(x))[0]
        expect = (adapter.rows[:, None] + adapter.columns[None, :]).reshape(4, -1)
        assert torch.allclose(pos, expect, atol=1e-6)
    assert adapter.output_norm.weight.detach().eq(0.05).all()
    d = cfg.to_dict()
    assert d["cells"] and d["output_positions"] and d["output_norm"] == 0.05 and AdapterConfig.from_dict(d) == cfg
    assert not {"cells", "output_positions", "output_norm"} & set(AdapterConfig(grid=4).to_dict())
    assert {"rows", "columns", "output_norm.weight"} <= set(adapter.state_dict())
    assert "outside_cell" not in adapter.state_dict()  # fixed mask: nothing stored
    with pytest.raises(ValueError, match="cells"):
        AdapterConfig(num_tokens=9, grid=4, cells=True)  # a 4x4 patch grid has no 3x3 cells
    with pytest.raises(ValueError):
        AdapterConfig(num_tokens=8, output_positions=True)
