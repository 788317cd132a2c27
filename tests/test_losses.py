import torch

from models.losses import clip_loss, hardest_negatives, listwise_itm_loss, random_negatives


def test_hardest_negative_is_the_most_similar_non_match_and_masks_hold():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.7],
                        [0.2, 0.9, 0.95, 0.1],
                        [0.3, 0.3, 0.9, 0.4],
                        [0.6, 0.5, 0.2, 0.9]])
    mask = torch.eye(4, dtype=torch.bool)
    assert hardest_negatives(sim, 1, mask).squeeze(1).tolist() == [1, 2, 3, 0]
    # Row 1's best non-diagonal item (2) is an identical caption: masked, so 0 is the hardest.
    mask[1, 2] = True
    assert hardest_negatives(sim, 1, mask)[1].item() == 0
    assert hardest_negatives(sim, 2, mask)[0].tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        r = random_negatives(mask, g)
        assert not mask[torch.arange(4), r].any()


def test_listwise_loss_prefers_positive_first_and_ignores_unscored_pairs():
    cap = torch.tensor([0, 0, 1, 1, 2])
    img = torch.tensor([0, 1, 1, 0, 2])
    good = listwise_itm_loss(torch.tensor([5.0, 0.0, 5.0, 0.0, 1.0]), cap, img, 3)
    bad = listwise_itm_loss(torch.tensor([0.0, 5.0, 0.0, 5.0, 1.0]), cap, img, 3)
    assert good < bad
    # Rows 0, 1 and columns 0, 1 are 2-way softmaxes at equal logits; item 2 has only its positive.
    even = listwise_itm_loss(torch.zeros(5), cap, img, 3)
    assert torch.isclose(even, torch.log(torch.tensor(2.0)) * 2 / 3)
    # By hand: row 0 softmax over (0,0), (0,1); column 1 over (0,1), (1,1); and so on.
    logits = torch.tensor([1.0, -1.0, 2.0, 0.5, 3.0], requires_grad=True)
    ce = lambda pos, other: -torch.log_softmax(torch.stack([pos, other]), 0)[0]
    rows = ce(logits[0], logits[1]) + ce(logits[2], logits[3]) + 0
    cols = ce(logits[0], logits[3]) + ce(logits[2], logits[1]) + 0
    assert torch.isclose(listwise_itm_loss(logits, cap, img, 3), (rows + cols) / 6)
    listwise_itm_loss(logits, cap, img, 3).backward()
    assert torch.isfinite(logits.grad).all()


def test_clip_loss_masks_identical_captions():
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(2.0)
    same = torch.zeros(4, 4, dtype=torch.bool)
    plain = clip_loss(emb, emb, scale)
    same[0, 1] = same[1, 0] = True
    masked = clip_loss(emb, emb, scale, same)
    assert masked < plain  # a masked competitor can only lower the loss


def test_preferred_negatives_come_first_and_masks_still_hold():
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.2],
                        [0.9, 1.0, 0.8, 0.3],
                        [0.1, 0.8, 1.0, 0.7],
                        [0.2, 0.3, 0.7, 1.0]])
    eye = torch.eye(4, dtype=torch.bool)
    prefer = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = hardest_negatives(sim, 2, eye, prefer)
    assert got[0].tolist() == [3, 2]  # both preferred, the more similar first, before 0.9
    assert got[1].tolist() == [3, 0]  # one preferred, then the hardest other (0.9)
    assert got[3].tolist() == [2, 1]  # nothing preferred: plain hardest
    masked = eye | torch.tensor([[0, 0, 0, 1]] + [[0, 0, 0, 0]] * 3, dtype=torch.bool)
    assert 3 not in hardest_negatives(sim, 2, masked, prefer)[0].tolist()  # a mask beats a preference


def test_mask_words_masks_whole_words_never_the_kept_ones_at_least_one_per_row():
    from models.losses import mask_words
    ids = torch.tensor([[101, 7, 8, 9, 10, 11, 102, 0], [101, 20, 21, 102, 0, 0, 0, 0], [101, 30, 102, 0, 0, 0, 0, 0]])
    # row 0: words 0 (tokens 1-2), 1 (token 3, kept visible: -1), 2 (tokens 4-5); row 2: nothing maskable
    words = torch.tensor([[-1, 0, 0, -1, 2, 2, -1, -1], [-1, 0, 1, -1, -1, -1, -1, -1], [-1] * 8])
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(ids.shape, dtype=torch.long)
    for _ in range(200):
        masked, labels = mask_words(ids, words, 103, 0.5, g)
        chosen = masked == 103
        assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == -100).all()
        assert not chosen[words == -1].any()  # special tokens, padding and kept words stay
        assert torch.equal(chosen[0, 1], chosen[0, 2]) and torch.equal(chosen[0, 4], chosen[0, 5])  # whole words
        assert chosen[0].any() and chosen[1].any() and not chosen[2].any()
        seen += chosen.long()
    assert 60 < seen[1, 1] < 140 and 60 < seen[0, 4] < 160  # ~half of the time (more when it is the fallback)
    assert (mask_words(ids, words, 103, 1.0, g)[0][words >= 0] == 103).all()


def test_mask_one_class_masks_every_word_of_one_class_per_row():
    from models.losses import mask_one_class
    ids = torch.arange(10, 18).repeat(3, 1)
    cls = torch.tensor([[-1, 0, 1, 0, 1, 2, -1, -1], [-1, 1, 1, -1, -1, -1, -1, -1], [-1] * 8])
    g = torch.Generator().manual_seed(0)
    picked = set()
    for _ in range(60):
        masked, labels = mask_one_class(ids, cls, 103, g)
        chosen = masked == 103
        assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == -100).all()
        row0 = {int(c) for c in cls[0][chosen[0]]}
        assert len(row0) == 1 and chosen[0].sum() == (cls[0] == row0.pop()).sum()  # all of that class, only it
        picked.add(int(cls[0][chosen[0]][0]))
        assert torch.equal(chosen[1], cls[1] == 1) and not chosen[2].any()
    assert picked == {0, 1, 2}


def test_mask_one_class_union_masks_every_object_word_as_one_more_choice():
    from models.losses import mask_one_class
    ids = torch.arange(10, 18).repeat(2, 1)
    cls = torch.tensor([[-1, 0, 1, 3, 3, 0, 1, -1], [-1, 0, -1, 3, -1, 0, -1, -1]])
    g = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(300):
        masked, labels = mask_one_class(ids, cls, 103, g, union=(0, 1, 2))
        chosen = masked == 103
        assert torch.equal(labels[chosen], ids[chosen]) and (labels[~chosen] == -100).all()
        key = tuple(sorted({int(c) for c in cls[0][chosen[0]]}))
        seen[key] = seen.get(key, 0) + 1
        # row 1 names one class of the union only: the union is not a choice there
        assert {int(c) for c in cls[1][chosen[1]]} in ({0}, {3})
    assert set(seen) == {(0,), (1,), (3,), (0, 1)} and min(seen.values()) > 50  # ~1/4 each
