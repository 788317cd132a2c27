"""Training on streamed image-caption shards (img2dataset layout): real photos, a random open_clip
backbone, bad samples, two gloo processes, a SIGKILL mid-run, and the checkpoint through the jobs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models import make_default
from pipeline import evaluate, make_demo_shards, retrieve, rerank, train
from tests.conftest import BEAM_LOCAL, demo_members, run_precompute, write_tar
from training.distributed import World
from training.stream import ShardStream

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 training shards of real photos, one with a corrupt image and a sample without a caption;
    a held-out shard; a random-weights open_clip backbone checkpoint (64 px ViT)."""
    d = tmp_path_factory.mktemp("corpus")
    make_demo_shards.main(["--output", str(d / "train"), "--shards", "4", "--per_shard", "24"])
    make_demo_shards.main(["--output", str(d / "val"), "--shards", "1", "--per_shard", "32", "--seed", "7"])
    bad = demo_members(9, 6, seed=3)
    bad = [(n, b"\xff\xd8 not a jpeg" if n.startswith(bad[0][0].split(".")[0]) and n.endswith(".jpg") else b)
           for n, b in bad]
    first_key = bad[0][0].split(".")[0]
    bad = [m for m in bad if not (m[0].endswith(".txt") and m[0].split(".")[0] == first_key.replace("0000", "0001"))]
    write_tar(d / "train" / "00004.tar", bad + [("lonely.jpg", dict(bad)[next(n for n, _ in bad if n.endswith(".jpg") and not n.startswith(first_key))])])
    make_default.main(["--output", str(d / "backbone")])
    return d


def args(corpus, out, *extra, steps=40):
    return ["--stage", "edje", "--data", f"{corpus}/train/*.tar", "--backbone", str(corpus / "backbone"),
            "--output", str(out), "--device", "cpu", "--batch_size_edje", "16", "--joint_layers", "2",
            "--num_tokens", "8", "--max_steps_edje", str(steps), "--eval_every", "10", "--warmup", "5",
            "--random_only_steps", "10", "--fusion", "--workers", "2", "--shuffle_buffer", "32",
            "--max_minutes_edje", "20", "--lr_joint", "1e-4", "--lr_adapter", "1e-3", *extra]


def test_streamed_training_lowers_the_loss_counts_bad_samples_and_its_checkpoint_runs_the_jobs(corpus, tmp_path):
    out = tmp_path / "run"
    final = train.run(args(corpus, out, "--val_data", f"{corpus}/val/*.tar", "--mlm_weight", "0.5", steps=30))
    history = json.loads((out / "edje" / "history.json").read_text())
    assert [r["step"] for r in history] == [10, 20, 30]
    assert history[-1]["loss_mean"] < history[0]["loss_mean"]
    data = history[-1]["data"]
    assert data["bad_image"] >= 1 and data["no_caption"] >= 1 and data["samples"] >= 30 * 16
    val = history[-1]["val"]
    assert val["queries"] == 32 and set(val["t2i"]) == {"first_stage", "reranked", "joint_encoder"}
    # a normal checkpoint: precompute -> retrieve -> rerank -> evaluate take it with --checkpoint alone
    store, cand, scores = tmp_path / "store", tmp_path / "candidates.jsonl", tmp_path / "scores.parquet"
    run_precompute(f"{corpus}/val/00000.tar", store, "--checkpoint", str(final))
    retrieve.run([*BEAM_LOCAL[:1], "--queries", f"{corpus}/val/queries.jsonl", "--store", str(store),
                  "--top_k", "8", "--output", str(cand), "--checkpoint", str(final)])
    rerank.run([*BEAM_LOCAL[:1], "--queries", str(cand), "--store", str(store), "--output", str(scores),
                "--checkpoint", str(final)])
    report = evaluate.run(["--queries", str(cand), "--scores", str(scores), "--output", str(tmp_path / "report")])["report"]
    assert report["counts"]["queries"] > 0 and 0 <= report["t2i"]["reranked"]["R@1"] <= 100


def test_two_gloo_processes_write_one_checkpoint_with_the_single_process_loss_curve(corpus, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    train.run(args(corpus, single, steps=20))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pipeline.train", *args(corpus, double, steps=20)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (double / "checkpoint" / "model.safetensors").exists() and not list(double.glob("**/*.tmp"))
    one = json.loads((single / "edje" / "history.json").read_text())
    two = json.loads((double / "edje" / "history.json").read_text())
    assert [r["step"] for r in one] == [r["step"] for r in two] == [10, 20]
    # the same global batch of 16 (8 per process) over other samples: the curves agree, not the digits
    for a, b in zip(one, two):
        assert abs(a["loss_mean"] - b["loss_mean"]) < 0.15 * a["loss_mean"], (one, two)
    assert two[-1]["data"]["samples"] >= 20 * 16  # both processes' readers counted


def test_a_run_killed_with_sigkill_resumes_from_its_last_state(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.train", *args(corpus, out, "--save_every", "4", "--workers", "0", "--eval_every", "12", steps=36)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "edje" / "state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and int(torch.load(state, weights_only=True)["step"]) >= 8:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = int(torch.load(state, weights_only=True)["step"])
    assert 8 <= saved < 36 and not (out / "checkpoint").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed {out / 'edje'} at step {saved}" in rerun.stderr
    steps = [r["step"] for r in json.loads((out / "edje" / "history.json").read_text())]
    assert steps == [12, 24, 36]  # each evaluation once
    assert json.loads((out / "edje" / "done.json").read_text())["step"] == 36
    assert (out / "checkpoint" / "model.safetensors").exists()


def test_a_vanished_shard_is_counted_and_skipped(corpus, tmp_path):
    import shutil
    shards = [str(tmp_path / f"{i}.tar") for i in range(2)]
    shutil.copy(corpus / "train" / "00000.tar", shards[0])
    shutil.copy(corpus / "train" / "00001.tar", shards[1])
    from models.checkpoint import load_backbone
    backbone = load_backbone(corpus / "backbone")
    stream = ShardStream(shards, backbone.image_transform(), lambda c: (torch.zeros(len(c), 4, dtype=torch.long),) * 3,
                         backbone.tokenizer(), 8, 0, World(), buffer=4)
    os.remove(shards[1])  # gone after the run planned it
    batches = iter(stream)
    got = [next(batches) for _ in range(6)]  # more than one pass over the surviving shard
    assert all(b["images"].shape[0] == 8 for b in got)
    assert got[-1]["counts"]["missing_shards"] >= 1 and got[-1]["counts"]["samples"] >= 48


def test_a_backbone_without_weights_is_refused_before_training(corpus, tmp_path, capsys):
    cfg = json.loads((corpus / "backbone" / "config.json").read_text())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"format": cfg["format"], "version": cfg["version"],
                                                  "backbone": cfg["backbone"]}))
    with pytest.raises(SystemExit, match="no backbone weights"):
        train.run(["--stage", "edje", "--data", f"{corpus}/train/*.tar", "--backbone", str(bare),
                   "--output", str(tmp_path / "run"), "--device", "cpu"])
    assert not (tmp_path / "run" / "edje").exists()


def test_distillation_from_a_teacher_checkpoint_on_the_same_backbone(corpus, tmp_path):
    """The backbone checkpoint is a whole (random) checkpoint: its adapter (16 tokens) and 6-layer
    joint encoder serve as the teacher. A teacher on another backbone is refused before training."""
    out = tmp_path / "run"
    train.run(args(corpus, out, "--teacher", str(corpus / "backbone"), "--distill_weight", "0.5", "--workers", "0",
                   "--max_text_tokens", "64",
                   "--eval_every", "3", steps=3))
    history = json.loads((out / "edje" / "history.json").read_text())
    assert [r["step"] for r in history] == [3] and history[0]["loss"] > 0
    other = tmp_path / "other"
    make_default.main(["--output", str(other), "--seed", "1"])
    with pytest.raises(SystemExit, match="its backbone is not --backbone's"):
        train.run(args(corpus, tmp_path / "refused", "--teacher", str(other), "--max_text_tokens", "64", steps=2))
    assert not (tmp_path / "refused" / "edje" / "history.json").exists()
