"""Evaluate: recall@k by hand on built rankings, the report files, strips, bad scores files, and
the retrieve -> rerank -> evaluate chain on the demo store."""
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation import inputs, metrics, strips
from evaluation.report import markdown_table
from pipeline import evaluate, rerank, retrieve
from tests.conftest import demo_members, write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def score_rows(spec):
    """{query_id: [(image_id, score), ...] best first} -> scores rows with ranks 1..n."""
    return [{"query_id": qid, "image_id": image_id, "rank": rank, "score": score, "first_stage_score": None}
            for qid, items in spec.items() for rank, (image_id, score) in enumerate(items, start=1)]


def run_eval(tmp_path, queries, scores, *extra, name="report"):
    qpath = write_jsonl(tmp_path / "candidates.jsonl", queries)
    spath = write_jsonl(tmp_path / "scores.jsonl", scores)
    out = tmp_path / name
    result = evaluate.run(["--queries", str(qpath), "--scores", str(spath), "--output", str(out), *extra])
    return result, out


# ---------------------------------------------------------------- T2I by hand

T2I_QUERIES = [
    # ties in candidate_scores: the list order is the ranking (b second), d never scored
    {"query_id": "qa", "text": "a", "candidates": ["a", "b", "c", "d"],
     "candidate_scores": [0.9, 0.9, 0.9, 0.1], "relevant": ["b"]},
    # x listed twice: counted once, at its first position (z third, not fourth); z not scored
    {"query_id": "qb", "text": "b", "candidates": ["x", "x", "y", "z"],
     "candidate_scores": [0.8, 0.8, 0.7, 0.6], "relevant": ["z"]},
    # relevant image not among the candidates: a miss at every k
    {"query_id": "qc", "text": "c", "candidates": ["m", "n"], "candidate_scores": [0.5, 0.4], "relevant": ["r"]},
    {"query_id": "qd", "text": "no relevant", "candidates": ["a"], "candidate_scores": [0.3]},
    {"query_id": "qe", "text": "empty relevant", "candidates": ["a"], "candidate_scores": [0.3], "relevant": []},
    # no scores rows at all: reranked = first stage
    {"query_id": "qf", "text": "f", "candidates": ["p", "q"], "candidate_scores": [0.9, 0.1], "relevant": ["p"]},
    "{oops",
    {"query_id": "qg", "text": "bad relevant", "candidates": ["a"], "relevant": "a"},
    {"query_id": "qa", "text": "same id again", "candidates": ["z"], "relevant": ["z"]},
]
T2I_SCORES = score_rows({"qa": [("b", 3.0), ("a", 2.0), ("c", 1.0)],
                         "qb": [("y", 2.0), ("x", 1.0)],
                         "qc": [("n", 2.0), ("m", 1.0)],
                         "qd": [("a", 1.0)]})


def test_t2i_recall_by_hand(tmp_path):
    result, out = run_eval(tmp_path, T2I_QUERIES, T2I_SCORES, "--ks", "1,2,3,5")
    report = result["report"]
    # first stage: qa hit at 2, qb at 3, qc never, qf at 1; reranked: qa at 1, qb at 3, qc never, qf at 1
    assert report["t2i"]["first_stage"] == {"R@1": 25.0, "R@2": 50.0, "R@3": 75.0, "R@5": 75.0}
    assert report["t2i"]["reranked"] == {"R@1": 50.0, "R@2": 50.0, "R@3": 75.0, "R@5": 75.0}
    c = report["counts"]
    assert c["queries"] == 4 and c["queries_read"] == 6 and c["queries_without_relevant"] == 2
    assert c["invalid_queries"] == {"duplicate_query_id": 1, "invalid_json": 1, "invalid_relevant": 1}
    assert c["duplicate_candidates"] == 1
    assert c["mean_candidates_per_query"] == 2.75 and c["max_candidates_per_query"] == 4
    assert c["t2i_candidate_recall"] == 75.0
    assert c["score_rows"] == 8 and c["unscored_candidates"] == 4 and c["queries_without_scores"] == 1
    assert c["ks"] == [1, 2, 3, 5]


def test_t2i_rankings_put_unscored_candidates_last_in_first_stage_order():
    queries = {"q": inputs.Query("q", "t", ["a", "b", "c", "d", "e"], None, frozenset({"e"}))}
    scores = {"q": [inputs.Scored("d", 1, 0.0), inputs.Scored("b", 2, -1.0)]}
    assert metrics.t2i_rankings(queries, scores) == {"q": (["a", "b", "c", "d", "e"], ["d", "b", "a", "c", "e"])}


# ---------------------------------------------------------------- I2T by hand

I2T_QUERIES = [
    {"query_id": "q1", "text": "1", "candidates": ["A", "B"], "candidate_scores": [0.9, 0.5], "relevant": ["A"]},
    {"query_id": "q2", "text": "2", "candidates": ["A", "C"], "candidate_scores": [0.95, 0.4], "relevant": ["C"]},
    {"query_id": "q3", "text": "3", "candidates": ["B", "A"], "candidate_scores": [0.7, 0.6], "relevant": ["B"]},
    {"query_id": "q4", "text": "4", "candidates": ["A"], "relevant": ["D"]},  # no candidate_scores
    {"query_id": "q5", "text": "5", "candidates": ["E"], "candidate_scores": [0.9], "relevant": ["F"]},
    {"query_id": "q6", "text": "6", "candidates": ["E"], "candidate_scores": [0.9], "relevant": ["E"]},
    {"query_id": "q7", "text": "no truth: not a distractor", "candidates": ["B"], "candidate_scores": [0.99]},
]
I2T_SCORES = score_rows({"q1": [("A", 5.0), ("B", 4.0)], "q2": [("A", 1.0), ("C", 0.0)],
                         "q3": [("B", 4.5)],  # (q3, A) not scored
                         "q4": [("A", 3.0)], "q5": [("E", 1.0)], "q6": [("E", 1.0)], "q7": [("B", 9.0)]})


def test_i2t_by_hand(tmp_path):
    result, _ = run_eval(tmp_path, I2T_QUERIES, I2T_SCORES, "--ks", "1,2,5")
    i2t = metrics.i2t_rankings(*_loaded(tmp_path))
    assert i2t["A"] == (["q2", "q1", "q3", "q4"],  # by candidate score; q4 has none: last
                        ["q1", "q4", "q2", "q3"],  # by rerank score; (q3, A) unscored: last
                        {"q1"})
    assert i2t["B"][:2] == (["q3", "q1"], ["q3", "q1"])  # q7 has no relevant: not ranked
    assert i2t["E"][:2] == (["q5", "q6"], ["q5", "q6"])  # equal scores: by query_id
    assert i2t["D"] == ([], [], {"q4"}) and i2t["F"] == ([], [], {"q5"})
    report = result["report"]
    # first stage: A at 2, B at 1, C at 1, E at 2, D and F in no list; reranked: A at 1, B 1, C 1, E 2
    assert report["i2t"]["first_stage"] == {"R@1": 33.33, "R@2": 66.67, "R@5": 66.67}
    assert report["i2t"]["reranked"] == {"R@1": 50.0, "R@2": 66.67, "R@5": 66.67}
    c = report["counts"]
    assert c["i2t_images"] == 6 and c["i2t_images_in_no_candidate_list"] == 2
    assert c["i2t_candidate_recall"] == 66.67 and c["i2t_pairs_without_first_stage_score"] == 1
    assert c["i2t_mean_queries_per_image"] == round((4 + 2 + 1 + 2) / 6, 2)


def _loaded(tmp_path):
    queries, _, _ = inputs.load_queries(str(tmp_path / "candidates.jsonl"))
    return queries, inputs.load_scores(str(tmp_path / "scores.jsonl"), queries)


def test_i2t_ranks_by_fused_score_when_present(tmp_path):
    rows = score_rows({"q1": [("A", 5.0), ("B", 4.0)], "q2": [("A", 1.0), ("C", 0.0)], "q3": [("B", 4.5)],
                       "q4": [("A", 3.0)], "q5": [("E", 1.0)], "q6": [("E", 1.0)]})
    for r in rows:
        r["fused_score"] = {("q6", "E"): 2.0, ("q1", "A"): -1.0}.get((r["query_id"], r["image_id"]), r["score"])
    run_eval(tmp_path, I2T_QUERIES[:6], rows)
    i2t = metrics.i2t_rankings(*_loaded(tmp_path))
    assert i2t["E"][1] == ["q6", "q5"] and i2t["A"][1] == ["q4", "q2", "q1", "q3"]


# ---------------------------------------------------------------- report files


def test_report_json_shape_markdown_and_plot(tmp_path, capsys):
    qpath, spath = tmp_path / "candidates.parquet", tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(I2T_QUERIES), qpath)  # missing fields become nulls
    pq.write_table(pa.Table.from_pylist(I2T_SCORES), spath)
    out = tmp_path / "rep"
    assert evaluate.main(["--queries", str(qpath), "--scores", str(spath), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["t2i", "i2t", "counts"]
    for mode in ("t2i", "i2t"):
        assert list(report[mode]) == ["first_stage", "reranked"]
        for stage in report[mode].values():
            assert list(stage) == ["R@1", "R@5", "R@10"]
            assert all(isinstance(v, float) and 0 <= v <= 100 and round(v, 2) == v for v in stage.values())
    assert report["t2i"]["first_stage"]["R@1"] == 50.0  # q1, q3, q6 hit at 1, of 6 queries
    md = (out / "report.md").read_text()
    table = markdown_table(report)
    assert table in md
    lines = table.splitlines()
    assert lines[0] == "| | T2I R@1 | T2I R@5 | T2I R@10 | I2T R@1 | I2T R@5 | I2T R@10 |"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["first stage", "reranked", "delta"]
    assert lines[4].split("|")[5].strip() == "+16.67"  # I2T R@1: 33.33 -> 50.00
    printed = capsys.readouterr().out
    assert table in printed and str(out / "report.json") in printed
    with Image.open(out / "recall_at_k.png") as im:
        im.load()
        assert im.format == "PNG" and im.size == (1100, 450)
        assert len(set(im.convert("L").getdata())) > 10  # drawn, not blank


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    (lambda rows: rows + [{"query_id": "ghost", "image_id": "A", "rank": 1, "score": 0.0}],
     "query 'ghost': scored, but not a valid query"),
    (lambda rows: rows + [dict(rows[0], rank=3)], "query 'q1': image 'A' has more than one scores row"),
    (lambda rows: [dict(r, rank=3) if (r["query_id"], r["rank"]) == ("q1", 2) else r for r in rows],
     "query 'q1': ranks are not 1..2"),
    (lambda rows: rows + [{"query_id": "q4", "image_id": "Z", "rank": 2, "score": 0.0}],
     "query 'q4': image 'Z' scored but not among its candidates"),
    (lambda rows: [dict(r, score=float("nan")) if r["query_id"] == "q2" else r for r in rows],
     "query 'q2': image 'A' has a non-finite score"),
    (lambda rows: [{k: v for k, v in r.items() if k != "rank"} for r in rows], "a row without rank"),
])
def test_bad_scores_file_exits_1_naming_the_query(tmp_path, capsys, change, message):
    qpath = write_jsonl(tmp_path / "candidates.jsonl", I2T_QUERIES)
    spath = write_jsonl(tmp_path / "scores.jsonl", change([dict(r) for r in I2T_SCORES]))
    code = evaluate.main(["--queries", str(qpath), "--scores", str(spath), "--output", str(tmp_path / "r")])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.json").exists()


def test_nothing_to_evaluate_and_bad_flags(tmp_path, capsys):
    queries = [{"query_id": "q", "text": "t", "candidates": ["a"]}]
    with pytest.raises(inputs.EvaluateError, match="no query to evaluate"):
        run_eval(tmp_path, queries, score_rows({"q": [("a", 1.0)]}))
    with pytest.raises(SystemExit):
        run_eval(tmp_path, queries, [], "--ks", "0,5")
    with pytest.raises(inputs.EvaluateError, match="no WebDataset shard"):
        run_eval(tmp_path, I2T_QUERIES, I2T_SCORES, "--images", str(tmp_path / "none-*.tar"))
    with pytest.raises(inputs.EvaluateError, match="no query file matches"):
        evaluate.run(["--queries", str(tmp_path / "nope.jsonl"), "--scores", "x", "--output", str(tmp_path)])
    with pytest.raises(inputs.EvaluateError, match="cannot read scores file"):
        evaluate.run(["--queries", str(tmp_path / "candidates.jsonl"), "--scores", str(tmp_path / "nope.parquet"),
                      "--output", str(tmp_path)])


def test_help_documents_every_flag():
    text = evaluate.parser().format_help()
    for flag in ("--queries", "--scores", "--output", "--images", "--strips", "--ks"):
        assert flag in text


# ---------------------------------------------------------------- strips


def png_bytes(colour, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_strips_from_a_generated_shard(tmp_path):
    colours = {"A": (255, 0, 0), "B": (0, 0, 255), "C": (255, 255, 0), "E": (0, 255, 255)}
    members = [(f"{k}.png", png_bytes(c)) for k, c in colours.items()] + [("B.txt", b"caption")]
    write_tar(tmp_path / "00000.tar", members)
    queries = [dict(q) for q in I2T_QUERIES]
    queries[0]["query_id"] = "dir/q1"  # not a safe file name
    scores = [dict(r, query_id="dir/q1") if r["query_id"] == "q1" else r for r in I2T_SCORES]
    (tmp_path / "rep" / "strips").mkdir(parents=True)
    (tmp_path / "rep" / "strips" / "stale.png").write_bytes(b"old")
    result, out = run_eval(tmp_path, queries, scores, "--images", str(tmp_path / "*.tar"), "--strips", "2",
                           name="rep")
    names = sorted(os.listdir(out / "strips"))
    assert len(names) == 2 and "q2.png" in names  # sorted by query_id: "dir/q1", "q2"
    assert [n for n in names if n != "q2.png"][0].startswith("dir_q1-")
    with Image.open(out / "strips" / "q2.png") as im:
        im = im.convert("RGB")
        width = strips.LABEL_W + strips.STRIP_TOP * (strips.THUMB + strips.PAD) + strips.PAD
        assert im.width == width and 250 < im.height < 400
        top = 2 * strips.PAD + 18  # one line of query text
        row_h = strips.THUMB + strips.CAPTION_H + strips.PAD

        def tile(row, i, dx, dy):
            return im.getpixel((strips.LABEL_W + i * (strips.THUMB + strips.PAD) + dx, top + row * row_h + dy))

        # q2: candidates A (not relevant), C (relevant); reranked: A, C as well
        mid = strips.THUMB // 2
        assert tile(0, 0, 1, mid) == strips.GREY and tile(0, 1, 1, mid) == strips.GREEN
        assert tile(0, 0, mid, mid) == colours["A"] and tile(0, 1, mid, mid) == colours["C"]
        assert tile(1, 1, 1, mid) == strips.GREEN
        assert tile(0, 2, mid, mid) == (255, 255, 255)  # only two candidates: no third tile


def test_strip_of_an_image_missing_from_the_shards_is_a_placeholder(tmp_path):
    write_tar(tmp_path / "00000.tar", [("A.png", png_bytes((255, 0, 0))), ("B.png", b"not an image")])
    result, out = run_eval(tmp_path, I2T_QUERIES, I2T_SCORES, "--images", str(tmp_path / "00000.tar"),
                           "--strips", "1")
    assert result["strips"] == [str(out / "strips" / "q1.png")]  # q1: A found, B undecodable
    with Image.open(result["strips"][0]) as im:
        assert im.size[0] > 700


# ---------------------------------------------------------------- end to end on the demo store


def recompute(candidates, scores, ks):
    """An independent, plain recomputation of T2I and I2T recall from the two files. With fused
    scores, "reranked" is the fused order and "joint_encoder" the logit's alone."""
    queries = [q for q in candidates if q.get("relevant")]
    fused = any(r.get("fused_score") is not None for r in scores)
    stages = {"reranked": "fused_score" if fused else "score", **({"joint_encoder": "score"} if fused else {})}
    by_query = {}
    for r in scores:
        by_query.setdefault(r["query_id"], []).append(r)
    t2i = {"first_stage": [], **{stage: [] for stage in stages}}
    for q in queries:
        t2i["first_stage"].append([c in q["relevant"] for c in q["candidates"]])
        for stage, field in stages.items():
            rows = by_query.get(q["query_id"], [])
            scored = [r["image_id"] for r in (sorted(rows, key=lambda r: r["rank"]) if stage == "reranked"
                                              else sorted(rows, key=lambda r: (-r[field], r["image_id"])))]
            ranked = scored + [c for c in q["candidates"] if c not in scored]
            t2i[stage].append([c in q["relevant"] for c in ranked])
    i2t = {"first_stage": [], **{stage: [] for stage in stages}}
    images = sorted({i for q in queries for i in q["relevant"]})
    for image in images:
        pairs = [(q["candidate_scores"][q["candidates"].index(image)], q["query_id"], image in q["relevant"])
                 for q in queries if image in q["candidates"]]
        i2t["first_stage"].append([p[2] for p in sorted(pairs, key=lambda p: (-p[0], p[1]))])
        for stage, field in stages.items():
            value = {(r["query_id"], r["image_id"]): r[field] for r in scores}
            key = [(value.get((p[1], image)), p) for p in pairs]
            rr = sorted(key, key=lambda v: (0, -v[0], v[1][1]) if v[0] is not None else (1, -v[1][0], v[1][1]))
            i2t[stage].append([v[1][2] for v in rr])
    out = {}
    for mode, lists in (("t2i", t2i), ("i2t", i2t)):
        out[mode] = {stage: {f"R@{k}": round(100 * sum(any(h[:k]) for h in hits) / len(hits), 2) for k in ks}
                     for stage, hits in lists.items()}
    return out, len(queries), len(images)


def test_retrieve_rerank_evaluate_chain(demo_store, demo_dir, tmp_path):
    store = demo_store[0]
    relevant = {}
    for s in range(3):
        members = dict(demo_members(s, 8))
        for name, data in members.items():
            if name.endswith(".txt"):
                relevant.setdefault(data.decode(), []).append(name[:-4])
    queries = [{"query_id": f"q{n:02d}", "text": text, "relevant": keys}
               for n, (text, keys) in enumerate(sorted(relevant.items()))]
    queries.append({"query_id": "zz", "text": "a query without ground truth"})
    qpath = write_jsonl(tmp_path / "queries.jsonl", queries)
    cpath, spath = tmp_path / "candidates.jsonl", tmp_path / "scores.parquet"
    retrieve.run(["--runner=DirectRunner", "--queries", str(qpath), "--store", str(store), "--top_k", "6",
                  "--output", str(cpath)])
    rerank.run(["--runner=DirectRunner", "--queries", str(cpath), "--store", str(store), "--output", str(spath)])
    out = tmp_path / "report"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore::DeprecationWarning")
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--queries", str(cpath), "--scores",
                           str(spath), "--output", str(out), "--images", f"{demo_dir}/{{00000..00002}}.tar",
                           "--strips", "3", "--ks", "1,3,5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.json'}" in proc.stdout and "| delta |" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    candidates = [json.loads(line) for line in cpath.read_text().splitlines()]
    want, n_queries, n_images = recompute(candidates, pq.read_table(spath).to_pylist(), (1, 3, 5))
    assert {m: report[m] for m in ("t2i", "i2t")} == want
    c = report["counts"]
    assert c["queries"] == n_queries == 16 and c["queries_without_relevant"] == 1 and c["i2t_images"] == n_images == 24
    assert c["mean_candidates_per_query"] == 6.0 and c["unscored_candidates"] == 0
    assert sorted(os.listdir(out / "strips")) == ["q00.png", "q01.png", "q02.png"]
    assert (out / "recall_at_k.png").stat().st_size > 10_000


def test_fused_scores_get_a_joint_encoder_alone_row(tmp_path):
    queries = [{"query_id": "q1", "text": "a", "candidates": ["a", "b", "c"], "candidate_scores": [0.9, 0.5, 0.1],
                "relevant": ["b"]},
               {"query_id": "q2", "text": "b", "candidates": ["d", "e"], "candidate_scores": [0.9, 0.2],
                "relevant": ["d"]}]
    # fused order (rank) puts b first for q1 and d for q2; the logits alone prefer c and e
    scores = [{"query_id": "q1", "image_id": i, "rank": r, "score": s, "first_stage_score": f, "fused_score": u}
              for i, r, s, f, u in (("b", 1, 0.5, 0.5, 3.0), ("a", 2, -1.0, 0.9, 2.0), ("c", 3, 2.0, 0.1, 1.0))]
    scores += [{"query_id": "q2", "image_id": i, "rank": r, "score": s, "first_stage_score": f, "fused_score": u}
               for i, r, s, f, u in (("d", 1, 0.0, 0.9, 2.0), ("e", 2, 1.0, 0.2, 1.5))]
    result, out = run_eval(tmp_path, queries, scores, "--ks", "1")
    report = json.loads((out / "report.json").read_text())
    assert report["t2i"]["first_stage"]["R@1"] == 50.0  # q2 only
    assert report["t2i"]["reranked"]["R@1"] == 100.0  # the fused order
    assert report["t2i"]["joint_encoder"]["R@1"] == 0.0  # c and e by the logit alone
    table = (out / "report.md").read_text()
    assert "| joint encoder alone |" in table and "| reranked (fused) |" in table
    # without fused_score there is no such row
    _, plain = run_eval(tmp_path, queries, [{k: v for k, v in r.items() if k != "fused_score"} for r in scores],
                        "--ks", "1", name="plain")
    assert "joint_encoder" not in json.loads((plain / "report.json").read_text())["t2i"]
