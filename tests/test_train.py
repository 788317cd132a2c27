"""A short real training run on CPU: both stages, the checkpoint it writes, resume."""
import json

import numpy as np
import pytest
import torch

from models.checkpoint import load_joint_encoder, load_scorer, load_vision_encoder
from pipeline import make_scenes, train
from training.evaluation import GROUNDING_ROWS, grounding_rows, warn_if_ungrounded
from training.loop import cosine_schedule
from training.scenes import neighbour_batches


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    make_scenes.main(["--split", "train", "--n", "96", "--seed", "3", "--output", str(d / "train")])
    make_scenes.main(["--split", "test", "--n", "16", "--seed", "4", "--output", str(d / "test")])
    return d


ARGS = ["--device", "cpu", "--batch_size", "32", "--batch_size_edje", "8", "--eval_every", "10",
        "--max_steps", "20", "--warmup", "2", "--random_only_steps", "5", "--joint_layers", "1",
        "--num_tokens", "4", "--max_text_tokens", "24", "--val_fraction", "0.25", "--patience", "10",
        "--clip_config", json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64,
                                                                      "layers": 1, "head_width": 32},
                                     "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32,
                                                  "heads": 1, "layers": 1}})]


def test_short_training_run_lowers_the_loss_and_writes_a_usable_checkpoint(scenes, tmp_path, capsys):
    out = tmp_path / "run"
    final = train.run(["--data", f"{scenes}/train/*.tar", "--test_data", f"{scenes}/test/*.tar",
                       "--output", str(out), *ARGS])
    clip = json.loads((out / "clip" / "history.json").read_text())
    edje = json.loads((out / "edje" / "history.json").read_text())
    assert clip[-1]["loss"] < clip[0]["loss"] < 10 and len(edje) == 2
    assert {"val_group_acc", "val_group_acc_i2t", "val_variant_acc", "val_score_spread"} <= set(edje[0])
    assert edje[0]["val_score_spread"] > 0  # scores differ between pairs
    assert set(edje[0]["val_variant_acc"]) <= {"v0", "v1", "v2", "v3"}
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["queries"] == 16 and 0 <= metrics["reranked_R@1"] <= 100
    # The checkpoint is a normal one: both halves load, tokens fit the joint encoder.
    encoder, cfg, fp = load_vision_encoder(final)
    joint, tokenizer, _, fp2 = load_joint_encoder(final)
    assert fp == fp2 and cfg.adapter.output_dim == joint.hidden_size and cfg.joint_encoder.base_model
    tokens, _ = encoder(torch.zeros(2, 3, 64, 64))
    ids, mask = tokenizer(["a red circle left of a blue square"] * 2)
    assert joint(ids, mask, tokens).shape == (2,)
    # word embeddings are not stored: they come from the MiniLM package
    from safetensors import safe_open
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert "joint.bert.embeddings.word_embeddings.weight" not in f.keys()
    # Rerunning resumes from the finished stages instead of training again.
    before = (out / "edje" / "done.json").read_text()
    train.run(["--data", f"{scenes}/train/*.tar", "--output", str(out), *ARGS])
    assert (out / "edje" / "done.json").read_text() == before


def pixels(image):
    return torch.as_tensor(np.asarray(image.convert("RGB")))


def test_a_mix_of_two_and_three_object_splits_trains_with_each_splits_groups_keys_and_answers(tmp_path):
    """Two splits drawn with the same seed (their keys and group numbers collide), 2 and 3 objects:
    loaded together, every scene keeps its own group, key and relevant set; a run trains on the mix
    and reports each test split on its own."""
    from training.scenes import load_scenes
    for objects in ("2", "3"):
        for split, n in (("train", "48"), ("test", "16")):
            make_scenes.main(["--split", split, "--n", n, "--seed", "3", "--objects", objects,
                              "--output", str(tmp_path / f"{split}{objects}")])
    two, three = (load_scenes(str(tmp_path / d / "*.tar"), pixels) for d in ("train2", "train3"))
    mix = load_scenes(f"{tmp_path}/train2/*.tar,{tmp_path}/train3/*.tar", pixels)
    n = len(two["keys"])
    assert two["keys"] == three["keys"] and len(set(mix["keys"])) == len(mix["keys"]) == 2 * n
    assert mix["keys"][:n] == [f"{tmp_path}/train2/{k}" for k in two["keys"]]
    assert mix["captions"] == two["captions"] + three["captions"] and torch.equal(
        mix["images"], torch.cat([two["images"], three["images"]]))
    assert mix["captions"][n].count(", and ") == 1  # the 3-object captions name the third object
    assert (mix["groups"][:n] == two["groups"]).all() and set(mix["groups"][n:]).isdisjoint(mix["groups"][:n])
    assert len(set(mix["groups"][n:])) == len(set(three["groups"]))
    assert mix["relevant"] == two["relevant"] + [[n + j for j in r] for r in three["relevant"]]
    out = tmp_path / "run"
    train.run(["--stage", "all", "--data", f"{tmp_path}/train2/*.tar,{tmp_path}/train3/*.tar",
               "--test_data", f"{tmp_path}/test2/*.tar,{tmp_path}/test3/*.tar", "--output", str(out),
               *ARGS, "--max_steps", "4", "--eval_every", "4"])
    metrics = json.loads((out / "test_metrics.json").read_text())["by_split"]
    assert sorted(metrics) == [f"{tmp_path}/test2", f"{tmp_path}/test3"]
    assert all(m["queries"] == 16 and 0 <= m["reranked_R@1"] <= 100 for m in metrics.values()), metrics


def test_grounding_rows_sample_every_split_in_proportion():
    """Validation rows are sorted by split directory: the grounding evaluation spreads its rows over
    all of them (a 2:1 mix gives 2:1 rows), and takes every row of a small validation set."""
    val = np.arange(0, 6000, 2)  # 3,000 rows: the first 2,000 from one split, the rest from another
    rows = grounding_rows(val)
    assert len(rows) == GROUNDING_ROWS == len(set(rows.tolist())) and np.isin(rows, val).all()
    assert np.isin(rows, val[:2000]).mean() == pytest.approx(2 / 3, abs=0.01)
    assert (grounding_rows(val[:100]) == val[:100]).all() and len(grounding_rows(val[:0])) == 0


def test_the_schedule_decays_over_weighted_work_and_the_time_cap_only_takes_over_when_ahead():
    assert cosine_schedule(0, 100, 10) == pytest.approx(0.1)
    assert cosine_schedule(55, 100, 10) == pytest.approx(0.5)
    assert cosine_schedule(100, 100, 10) == pytest.approx(0.0)
    # MLM-only steps (the first 50) counting a quarter: by step 50 only 10 of 60 units of work are done
    work = lambda s: 0.25 * min(s, 50) + max(0, s - 50)
    assert cosine_schedule(50, 100, 10, work=work) == pytest.approx(0.5 * (1 + np.cos(np.pi * 10 / 60)))
    assert cosine_schedule(50, 100, 10, time_fraction=0.1, work=work) == cosine_schedule(50, 100, 10, work=work)
    assert cosine_schedule(50, 100, 10, time_fraction=0.9, work=work) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.9)))


def test_a_seeded_run_with_step_budgets_writes_the_same_checkpoint_twice(scenes, tmp_path):
    """The demo recipe's reproduction rests on this: with per-stage step budgets the rates follow
    steps alone, so a busy machine (this suite's) trains the same model as an idle one."""
    def run(out):
        train.run(["--data", f"{scenes}/train/*.tar", "--output", str(out), *ARGS, "--max_steps_clip", "12",
                   "--max_steps_edje", "14", "--max_minutes_clip", "60", "--max_minutes_edje", "60"])
        return out
    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    for r in (a, b):
        assert json.loads((r / "clip" / "done.json").read_text())["step"] == 12
        assert json.loads((r / "edje" / "done.json").read_text())["step"] == 14
    assert (a / "checkpoint" / "model.safetensors").read_bytes() == (b / "checkpoint" / "model.safetensors").read_bytes()
    history = [[{k: v for k, v in rec.items() if k != "seconds"} for rec in json.loads((r / "edje" / "history.json").read_text())]
               for r in (a, b)]
    assert history[0] == history[1]
    assert json.loads((a / "edje" / "done.json").read_text())["stopped"] == "steps"


def test_narrow_joint_encoder_with_mlm_local_adapter_and_neighbour_batches_trains_and_loads(scenes, tmp_path):
    out = tmp_path / "run"
    final = train.run(["--data", f"{scenes}/train/*.tar", "--output", str(out), *ARGS, "--joint_width", "64",
                       "--mlm_weight", "0.5", "--adapter_locality", "0.5", "--image_positions", "fixed",
                       "--edje_batching", "neighbours"])
    edje = json.loads((out / "edje" / "history.json").read_text())
    assert len(edje) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in edje)
    encoder, cfg, _ = load_vision_encoder(final)
    joint, tokenizer, _, _ = load_joint_encoder(final)
    assert cfg.adapter.locality == 0.5 and cfg.adapter.output_dim == joint.hidden_size == 64
    assert cfg.joint_encoder.base_model is None and cfg.joint_encoder.image_positions == "fixed"
    from safetensors import safe_open
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # A narrow encoder's embeddings are its own (projected from MiniLM's): stored. The MLM head is
    # training-only: not stored.
    assert "joint.bert.embeddings.word_embeddings.weight" in keys and "adapter.attention_bias" in keys
    assert {k.split(".")[0] for k in keys} == {"backbone", "adapter", "joint"}
    tokens, _ = encoder(torch.rand(2, 3, 64, 64))
    ids, mask = tokenizer(["a red circle left of a blue square", "a blue square"])
    # The jobs score with the fused scorer: same logits as the training-time module.
    scorer, _, _, _ = load_scorer(final)
    with torch.no_grad():
        assert torch.allclose(scorer(ids, mask, tokens), joint(ids, mask, tokens), atol=1e-4)


def test_text_only_lower_layers_stay_minilm_and_are_not_stored(scenes, tmp_path):
    out = tmp_path / "run"
    final = train.run(["--data", f"{scenes}/train/*.tar", "--output", str(out), *ARGS, "--joint_layers", "2",
                       "--text_layers", "1", "--mlm_weight", "0.5", "--fusion", "--adapter_output_norm", "1.0"])
    edje = json.loads((out / "edje" / "history.json").read_text())
    assert len(edje) == 2 and all(np.isfinite(r["loss"]) for r in edje)
    from safetensors import safe_open
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = {k for k in f.keys() if k.startswith("joint.")}
    # the frozen text layer and embeddings load from the MiniLM package; the joint layer is stored
    assert not any(k.startswith(("joint.bert.encoder.layer.0.", "joint.bert.embeddings.")) for k in keys)
    assert any(k.startswith("joint.bert.encoder.layer.1.") for k in keys)
    joint, tokenizer, cfg, _ = load_joint_encoder(final)
    assert cfg.joint_encoder.text_layers == 1 and cfg.joint_encoder.fusion_weight > 0
    from models.joint_encoder import JointEncoder
    base = JointEncoder(cfg.joint_encoder)  # MiniLM's own weights
    for (name, p), (_, q) in zip(joint.bert.encoder.layer[0].named_parameters(),
                                 base.bert.encoder.layer[0].named_parameters()):
        assert torch.equal(p, q), name
    encoder, _, _ = load_vision_encoder(final)
    tokens, _ = encoder(torch.rand(3, 3, 64, 64))
    ids, mask = tokenizer(["a red circle left of a blue square", "a blue square", "a red circle"])
    scorer, _, _, _ = load_scorer(final)
    with torch.no_grad():
        assert torch.allclose(scorer(ids, mask, tokens), joint(ids, mask, tokens), atol=1e-4)


@pytest.mark.parametrize("flags", [["--joint_width", "100"], ["--mlm_probability", "0"], ["--neighbour_share", "1.5"],
                                   ["--text_layers", "3"], ["--frozen_text_layers", "1"],
                                   ["--joint_width", "64", "--text_layers", "1", "--frozen_text_layers", "1"]])
def test_bad_training_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x", "--output", "y", *flags])
    assert flags[0] in capsys.readouterr().err


def test_neighbour_batches_hold_whole_nearby_groups_each_once_per_epoch():
    groups = np.repeat(np.arange(50), 4)  # 50 scene groups of 4
    cluster = torch.as_tensor(groups // 10)  # 5 clusters of 10 groups, far apart under the backbone
    emb = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    emb[torch.arange(200), cluster] += 5
    batches = neighbour_batches(np.arange(200), groups, emb, 16, np.random.default_rng(0))
    epoch = [next(batches) for _ in range(12)]  # 12 full batches of 4 groups; 2 groups left over
    seen = np.concatenate(epoch)
    assert len(seen) == len(set(seen.tolist())) == 192
    assert all(np.bincount(groups[b]).max() == 4 and len(set(groups[b].tolist())) == 4 for b in epoch)
    one_cluster = sum(len(set(cluster[b].tolist())) == 1 for b in epoch)
    assert one_cluster >= 8  # random groups would share one cluster in ~1 batch in 100
    assert len(set(np.concatenate([next(batches) for _ in range(12)]).tolist())) == 192  # next epoch
    # share 0.5: the first half of a batch is one group and its nearest, the rest random groups
    half = neighbour_batches(np.arange(200), groups, emb, 16, np.random.default_rng(0), share=0.5)
    epoch = [next(half) for _ in range(12)]
    assert len(set(np.concatenate(epoch).tolist())) == 192
    assert sum(len(set(cluster[b[:8]].tolist())) == 1 for b in epoch) >= 10
    assert sum(len(set(cluster[b].tolist())) == 1 for b in epoch) <= 4


def test_fusion_adds_the_first_stage_cosine_inside_the_listwise_loss():
    import torch.nn.functional as F
    from models.adapter import AdapterConfig, TokenCompressionAdapter
    from models.joint_encoder import JointEncoder, JointEncoderConfig, Tokenizer
    torch.manual_seed(0)
    b = 8
    adapter = TokenCompressionAdapter(AdapterConfig(num_tokens=4, input_dim=64, output_dim=384, num_heads=2, mlp_dim=128))
    joint = JointEncoder(JointEncoderConfig(bert_overrides={"num_hidden_layers": 1}, max_text_tokens=16))
    ids, mask = Tokenizer(joint.cfg)([f"caption number {i}" for i in range(b)])
    patch, emb = torch.randn(b, 16, 64), F.normalize(torch.randn(b, 32), dim=-1)
    from training.batches import EdjeBatch
    from training.objectives import EdjeObjective, Fusion
    batch = EdjeBatch(patch, emb, emb, ids, mask, torch.full_like(ids, -1), torch.arange(b), torch.arange(b))

    def loss(fusion):  # a first stage that knows every pair: each caption's embedding is its image's
        return EdjeObjective(adapter, joint, fusion=fusion)(batch, 2, torch.Generator().manual_seed(0))[0]
    alone = loss(None)
    assert loss(Fusion(50.0)) < 0.01 < 0.5 < alone  # the untrained joint encoder alone is near chance
    fusion = Fusion(2.0)
    fused = loss(fusion)
    fused.backward()
    w = fusion.weight
    assert fused < alone and w.grad < 0  # more weight on the (here perfect) first stage lowers the loss



def test_mlm_phase_ending_with_ungrounded_object_words_is_warned(caplog):
    with caplog.at_level("WARNING", logger="train"):
        assert warn_if_ungrounded({"objects": {"own": 64.0, "other": 40.0, "none": 35.0}}, 2000)
        assert not warn_if_ungrounded({"objects": {"own": 84.5, "other": 40.0, "none": 35.0}}, 2000)
        assert not warn_if_ungrounded({"colour": {"own": 10.0}}, 2000)  # no object-words rule: nothing to say
    assert len(caplog.records) == 1 and "64.0%" in caplog.text and "--mlm_only_steps" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("mix", [{"2": 400}, {"2": 200, "3": 200}], ids=["two_objects", "two_and_three_objects"])
def test_reduced_edje_run_on_the_shipped_backbone_grounds_object_words(mix, tmp_path):
    """A real, reduced edje stage (objects-MLM only, on the embedded checkpoint's trained backbone),
    on 2-object scenes and on a mix of 2- and 3-object splits: masked colour and shape words come to
    be read from the caption's own image, not another's."""
    for objects, n in mix.items():
        make_scenes.main(["--split", "train", "--n", str(n), "--seed", "5", "--objects", objects,
                          "--output", str(tmp_path / f"scenes{objects}")])
    data = ",".join(f"{tmp_path}/scenes{objects}/*.tar" for objects in mix)
    out = tmp_path / "run"
    train.run(["--stage", "edje", "--loader", "memory", "--backbone", "models/default", "--data", data,
               "--output", str(out), "--device", "cpu", "--seed", "0", "--val_fraction", "0.2",
               "--batch_size_edje", "32", "--joint_layers", "2", "--text_layers", "1", "--frozen_text_layers", "0",
               "--num_tokens", "16", "--max_text_tokens", "32", "--image_positions", "fixed", "--adapter_cells",
               "--adapter_output_positions", "--adapter_output_norm", "1.0", "--mlm_words", "objects",
               "--mlm_only_steps", "200", "--max_steps_edje", "200", "--max_minutes_edje", "30",
               "--eval_every", "50", "--warmup", "20"])
    history = json.loads((out / "edje" / "history.json").read_text())
    first, last = history[0]["val_grounding"], history[-1]["val_grounding"]
    # colour words ground first: they rise and are read from the caption's own image
    assert last["colour"]["own"] > first["colour"]["own"] + 10, (first, last)
    assert last["colour"]["own"] > last["colour"]["other"] + 15, last
    # shape words follow (slower; at these 200 steps they have started on 2-object scenes, not yet on
    # the mix, whose captions mask three shapes at once)
    if "3" not in mix:
        assert last["shape"]["own"] > first["shape"]["own"] and last["shape"]["own"] > last["shape"]["other"] + 5, last


def test_accumulated_batches_step_once_with_their_mean_gradient(tmp_path):
    """fit(accumulate=2): one optimizer step per two batches, on the mean of their gradients."""
    import argparse
    from training.loop import Trainer, fit
    data = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])]

    def run(accumulate):
        w = torch.nn.Parameter(torch.zeros(2))
        opt_args = argparse.Namespace(weight_decay=0.0, warmup=0, patience=10)
        trainer = Trainer(opt_args, tmp_path / f"a{accumulate}", [w], 0.1, max_steps=1)
        trainer.opt = torch.optim.SGD([w], lr=0.1)
        trainer.start_clock(1.0, True)
        feed = iter(data)

        def step(_):
            x = next(feed) if accumulate > 1 else torch.stack(data).mean(0)
            loss = (w * x).sum()
            return loss, loss.item(), {}
        fit(trainer, "t", step, lambda: (0.0, {}), 10, {"w": torch.nn.Linear(1, 1)}, [0.1], [w], accumulate=accumulate)
        return w.detach()
    assert torch.allclose(run(2), run(1)) and not torch.equal(run(1), torch.zeros(2))
