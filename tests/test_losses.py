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


def test_listwise_loss_prefers_positive_first():
    good = torch.tensor([[5.0, 0.0, -1.0]])
    bad = torch.tensor([[0.0, 5.0, -1.0]])
    assert listwise_itm_loss(good) < listwise_itm_loss(bad)
    assert torch.isclose(listwise_itm_loss(torch.zeros(1, 4)), torch.log(torch.tensor(4.0)))


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
