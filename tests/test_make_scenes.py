"""The compositional scenes generator: determinism, disjoint splits, captions true only for their
own variant (checked by an independent caption reader against the scene graphs' geometry),
images, shard/query layout, and precompute reading the shards."""
import io
import itertools
import json
import re
import tarfile

import pytest
from PIL import Image

from pipeline import make_scenes as ms
from scenes import vocabulary
from tests.conftest import run_precompute

COLOR = "|".join(vocabulary.COLORS)
SHAPE = "|".join(vocabulary.SHAPES)
MENTION = re.compile(rf"\b(?:(small|large) )?({COLOR}) ({SHAPE})\b")
NEAR = {"to its left": "left of", "to its right": "right of", "above it": "above", "below it": "below"}
KEY = re.compile(r"(train|test)(\d{6})v([0-3])")


def make(tmp_path_factory, name, *args):
    out = tmp_path_factory.mktemp(name)
    summary = ms.main(["--output", str(out), *args])
    return out, summary


def read_dir(d):
    """{key: {ext: bytes}} over every shard, plus the member names per shard in order."""
    samples, members = {}, {}
    for shard in sorted(d.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members[shard.name] = tar.getmembers()
            for m in members[shard.name]:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples, members


def graphs(d):
    return {k: json.loads(v["json"]) for k, v in read_dir(d)[0].items()}


def groups_of(gs):
    out = {}
    for key in sorted(gs):
        out.setdefault(gs[key]["group"], []).append(gs[key])
    return out


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return make(tmp_path_factory, "train", "--split", "train", "--n", "1600", "--seed", "0",
                "--per_shard", "500")


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    return make(tmp_path_factory, "test", "--split", "test", "--n", "1600", "--seed", "0", "--per_shard", "500")


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return make(tmp_path_factory, "three", "--split", "test", "--n", "400", "--seed", "3", "--objects", "3")


# --- an independent reader of captions ----------------------------------------------------------

def read_caption(text):
    """(mentions, relations): mentions [(size or None, colour, shape)], relations [(i, rel, j)]
    between mention indices, j == "them" meaning every other mention."""
    head, sep, tail = text.rpartition(", and ")
    if not sep:
        head, tail = text, ""
    mentions = MENTION.findall(head)
    assert len(mentions) == 2, text
    near = [phrase for phrase in NEAR if phrase in head]
    if head.startswith("on the left"):
        relations = [(0, "left of", 1)]
    elif head.startswith("at the top"):
        relations = [(0, "above", 1)]
    elif near:
        relations = [(1, NEAR[near[0]], 0)]
    else:
        relations = [(0, re.search(r"left of|right of|above|below", head).group(0), 1)]
    if tail:
        third = MENTION.findall(tail)
        assert len(third) == 1, text
        mentions.append(third[0])
        if tail.endswith(" below them"):
            relations.append((2, "below", "them"))
        elif tail.endswith(" to the right of them"):
            relations.append((2, "right of", "them"))
    return [(s or None, c, sh) for s, c, sh in mentions], relations


def holds(p, rel, q):
    dx, dy = p["x"] - q["x"], p["y"] - q["y"]
    return {"left of": dx < 0 and abs(dx) > abs(dy), "right of": dx > 0 and abs(dx) > abs(dy),
            "above": dy < 0 and abs(dy) > abs(dx), "below": dy > 0 and abs(dy) > abs(dx)}[rel]


def true_of(text, graph):
    """Is every claim of the caption true of the scene graph (objects, sizes, positions)?"""
    mentions, relations = read_caption(text)
    if len(mentions) != len(graph["objects"]):
        return False
    found = []
    for size, color, shape in mentions:
        match = [o for o in graph["objects"] if o["color"] == color and o["shape"] == shape
                 and size in (None, o["size"])]
        if len(match) != 1:
            return False
        found.append(match[0])
    for i, rel, j in relations:
        others = [found[k] for k in range(len(found)) if k != i] if j == "them" else [found[j]]
        if not all(holds(found[i], rel, o) for o in others):
            return False
    return True


def signature(graph):
    """Canonical scene: objects' shape/colour/size with the relation, ignoring jitter."""
    objs = [(o["shape"], o["color"], o["size"]) for o in graph["objects"]]
    rel = graph["relation"]
    if rel in ("right of", "below"):
        objs[0], objs[1], rel = objs[1], objs[0], {"right of": "left of", "below": "above"}[rel]
    return (objs[0], rel, objs[1], *objs[2:])


# --- tests --------------------------------------------------------------------------------------

def test_reader_on_examples():
    g = {"objects": [{"shape": "circle", "color": "red", "size": "small", "x": 10, "y": 30},
                     {"shape": "square", "color": "blue", "size": "large", "x": 50, "y": 32}],
         "relation": "left of"}
    for text in ["a red circle left of a blue square", "a blue square to the right of a red circle",
                 "on the left a red circle, on the right a blue square",
                 "a small red circle is to the left of a large blue square",
                 "there is a red circle and, to its right, a blue square",
                 "a blue square with a red circle to its left",
                 "the blue square is to the right of the red circle"]:
        assert true_of(text, g), text
    for text in ["a blue circle left of a red square", "a red circle right of a blue square",
                 "a large red circle left of a blue square",
                 "there is a red circle and, to its left, a blue square",
                 "a red circle left of a blue square, and a green star"]:
        assert not true_of(text, g), text


def test_every_caption_is_true_only_for_its_own_variant(train, test_split, three):
    for d, _ in (train, test_split, three):
        for group, variants in groups_of(graphs(d)).items():
            assert [g["variant"] for g in variants] == [0, 1, 2, 3]
            captions = [g["caption"] for g in variants]
            assert len(set(captions)) == 4, captions
            truth = [[true_of(c, g) for g in variants] for c in captions]
            assert truth == [[i == j for j in range(4)] for i in range(4)], (captions, truth)


def test_variants_are_the_stated_changes(train, three):
    for d, _ in (train, three):
        for variants in groups_of(graphs(d)).values():
            v0, v1, v2, v3 = ([(o["shape"], o["color"], o["size"]) for o in g["objects"]] for g in variants)
            rel = [g["relation"] for g in variants]
            (s0, c0, z0), (s1, c1, z1) = v0[:2]
            assert len({o[0] for o in v0}) == len(v0) and len({o[1] for o in v0}) == len(v0)
            assert v1 == [(s0, c1, z0), (s1, c0, z1), *v0[2:]] and rel[1] == rel[0]
            assert v2 == v0 and rel[2] == vocabulary.INVERSE[rel[0]]
            assert rel[3] == rel[0]
            diffs = [(a, b) for oa, ob in zip(v0, v3) for a, b in zip(oa, ob) if a != b]
            assert len(diffs) == 1
            old, new = diffs[0]
            assert new not in {x for o in v0 for x in o[:2]}
            # v2 swaps the positions of objects 0 and 1; the rest of the layout is shared
            p0, p2 = variants[0]["objects"], variants[2]["objects"]
            assert (p2[0]["x"], p2[0]["y"]) == (p0[1]["x"], p0[1]["y"])
            xyr = [[(o["x"], o["y"], o["r"]) for o in g["objects"]] for g in variants]
            assert xyr[3] == xyr[0] == xyr[1]


def test_splits_never_share_a_scene(train, test_split, three, tmp_path_factory):
    other, _ = make(tmp_path_factory, "train1", "--split", "train", "--n", "800", "--seed", "1")
    tr = {signature(g) for d in (train[0], other) for g in graphs(d).values()}
    te = {signature(g) for d in (test_split[0], three[0]) for g in graphs(d).values()}
    assert len(tr) > 300 and len(te) > 100
    assert not tr & te
    for d, split in ((train[0], "train"), (test_split[0], "test"), (three[0], "test")):
        for g in graphs(d).values():
            objs = [vocabulary.Obj(o["shape"], o["color"], o["size"]) for o in g["objects"]]
            assert g["split"] == split == vocabulary.split_of(objs, g["relation"])
            assert vocabulary.scene_signature(g["objects"], g["relation"]) == vocabulary.scene_signature(objs, g["relation"])
    # different seeds give different scenes
    first = [g["caption"] for _, g in sorted(graphs(train[0]).items())][:800]
    assert first != [g["caption"] for _, g in sorted(graphs(other).items())]


def test_same_arguments_give_identical_bytes(tmp_path):
    args = ["--split", "test", "--n", "60", "--seed", "7", "--per_shard", "24", "--objects", "3"]
    ms.main(["--output", str(tmp_path / "a"), *args])
    ms.main(["--output", str(tmp_path / "b"), *args])
    ms.main(["--output", str(tmp_path / "b"), *args])  # rerun into the same directory
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["00000.tar", "00001.tar", "00002.tar", "queries.jsonl"]
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_images_decode_and_match_their_scene_graph(train, three):
    for d, _ in (train, three):
        samples, _ = read_dir(d)
        for key in sorted(samples)[:200]:
            s = samples[key]
            im = Image.open(io.BytesIO(s["png"]))
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
            g = json.loads(s["json"])
            for o in g["objects"]:
                assert im.getpixel((int(o["x"]), int(o["y"]))) == vocabulary.COLORS[o["color"]], (key, o)
                assert o["r"] <= o["x"] <= 64 - o["r"] and o["r"] <= o["y"] <= 64 - o["r"]
            for a, b in itertools.combinations(g["objects"], 2):
                assert ((a["x"] - b["x"]) ** 2 + (a["y"] - b["y"]) ** 2) ** 0.5 > a["r"] + b["r"] + 1
        split = KEY.fullmatch(next(iter(samples))).group(1)
        for g in range(20):
            pixels = {Image.open(io.BytesIO(samples[f"{split}{g:06d}v{v}"]["png"])).tobytes() for v in range(4)}
            assert len(pixels) == 4


def test_shard_and_query_layout(train, capsys, tmp_path):
    d, summary = train
    assert summary == {"split": "train", "samples": 1600, "groups": 400, "shards": 4, "output": str(d)}
    samples, members = read_dir(d)
    assert sorted(members) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert [len(m) for m in members.values()] == [3 * 500, 3 * 500, 3 * 500, 3 * 100]
    shard_of_group = {}
    for shard, ms_ in members.items():
        names = [m.name for m in ms_]
        assert names == sorted(names)
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile() for m in ms_)
        for n in names:
            key = n.split(".")[0]
            assert KEY.fullmatch(key) and "." not in key
            assert shard_of_group.setdefault(int(KEY.fullmatch(key).group(2)), shard) == shard
    for key, s in samples.items():
        assert sorted(s) == ["json", "png", "txt"]
        g = json.loads(s["json"])
        assert sorted(g) == ["caption", "group", "objects", "relation", "sizes_in_caption", "split", "variant"]
        assert g["sizes_in_caption"] == bool({"small", "large"} & set(g["caption"].replace(",", " ").split()))
        assert all(sorted(o) == ["color", "r", "shape", "size", "x", "y"] for o in g["objects"])
        assert key == f"train{g['group']:06d}v{g['variant']}" and s["txt"].decode() == g["caption"]
    queries = [json.loads(line) for line in (d / "queries.jsonl").read_text().splitlines()]
    assert [q["query_id"] for q in queries] == sorted(samples)
    scene = {k: json.loads(s["json"]) for k, s in samples.items()}

    def says(k, with_size):
        return vocabulary.scene_signature(scene[k]["objects"], scene[k]["relation"], with_size)
    for q in queries:
        g = scene[q["query_id"]]
        w = g["sizes_in_caption"]  # a caption without sizes is true for the scene at any sizes
        true_for = sorted(k for k in samples if says(k, w) == says(q["query_id"], w))  # redrawn scenes too
        assert q == {"query_id": q["query_id"], "text": g["caption"], "relevant": true_for,
                     "group": g["group"], "variant": g["variant"]}
    assert any(len(q["relevant"]) > 1 for q in queries) or len(queries) < 50
    assert any(not scene[q["query_id"]]["sizes_in_caption"] and
               any(says(k, True) != says(q["query_id"], True) for k in q["relevant"]) for q in queries) \
        or len(queries) < 200  # some size-free captions answer a scene of other sizes
    # N rounds up to a multiple of 4, per_shard down; a one-line JSON summary on stdout
    capsys.readouterr()
    small = ms.main(["--split", "train", "--n", "10", "--seed", "0", "--per_shard", "10",
                     "--output", str(tmp_path / "s")])
    assert json.loads(capsys.readouterr().out) == small
    assert (small["samples"], small["groups"], small["shards"]) == (12, 3, 2)
    with pytest.raises(SystemExit):  # a smaller run would leave the third shard behind
        ms.main(["--split", "train", "--n", "4", "--seed", "0", "--output", str(tmp_path / "s")])


def test_templates_and_sizes_vary(train, three):
    captions = [g["caption"] for d, _ in (train, three) for g in graphs(d).values()]
    forms = {MENTION.sub("X", c).split(", and ")[0] for c in captions}  # "an X is to the left of an X", ...
    forms = {re.sub(r"left of|right of|above|below|left|right|top|bottom", "R", f).replace("an X", "a X")
             for f in forms}
    assert len(forms) >= 6, forms
    with_size = sum(bool(re.search(r"\b(small|large)\b", c)) for c in captions)
    assert 0.2 < with_size / len(captions) < 0.6
    assert {o["size"] for g in graphs(train[0]).values() for o in g["objects"]} == {"small", "large"}


def test_precompute_reads_the_shards(tmp_path):
    d = tmp_path / "scenes"
    ms.main(["--split", "test", "--n", "24", "--seed", "0", "--per_shard", "12", "--output", str(d)])
    summary = run_precompute(f"{d}/{{00000..00001}}.tar", tmp_path / "store")
    assert summary["images"] == 24 and summary["failures"] == 0 and summary["duplicates"] == 0
    assert summary["shards"] == 2 and summary["failed_shards"] == 0
