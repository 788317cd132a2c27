"""Data parallel EDJE: two gloo processes give the single process's loss and gradients exactly."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.batches import EdjeBatch
from training.distributed import World

B = 8


def parts(seed=0):
    from models.adapter import AdapterConfig, TokenCompressionAdapter
    from models.joint_encoder import JointEncoder, JointEncoderConfig, Tokenizer
    from models.losses import MaskedLMHead
    from models.mlm import Mlm, caption_words
    from training.objectives import Fusion
    torch.manual_seed(seed)
    adapter = TokenCompressionAdapter(AdapterConfig(num_tokens=4, input_dim=32, output_dim=384, num_heads=2, mlp_dim=64))
    joint = JointEncoder(JointEncoderConfig(bert_overrides={"num_hidden_layers": 1}, max_text_tokens=16))
    tokenizer = Tokenizer(joint.cfg)
    mlm = Mlm(MaskedLMHead(joint.bert.embeddings.word_embeddings), tokenizer.tok.mask_token_id, 0.5, 0.5)
    captions = [f"a {c} {s} in the picture" for c, s in zip("red blue green red pink grey red blue".split(),
                                                            "circle square star cross square circle star dot".split())]
    ids, mask, words, _ = caption_words(tokenizer, captions, "content")
    g = torch.Generator().manual_seed(1)
    emb_i, emb_t = F.normalize(torch.randn(B, 16, generator=g), dim=-1), F.normalize(torch.randn(B, 16, generator=g), dim=-1)
    keys = torch.arange(B)
    keys[7] = 0  # item 7 shows the same image as item 0: never a negative of it
    batch = EdjeBatch(torch.randn(B, 9, 32, generator=g), emb_i, emb_t, ids, mask, words, torch.arange(B), keys,
                      torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    return adapter, joint, mlm, Fusion(5.0), batch


def share(batch: EdjeBatch, rank: int, size: int) -> EdjeBatch:
    n = B // size
    return EdjeBatch(*(getattr(batch, f)[rank * n:(rank + 1) * n] for f in EdjeBatch.__dataclass_fields__))


def loss_and_grads(world: World, batch, itm: bool):
    from training.objectives import EdjeObjective
    adapter, joint, mlm, fusion, full = parts()
    objective = EdjeObjective(adapter, joint, mlm, fusion, world=world).eval()  # no dropout: exact comparison
    model = objective
    if world.size > 1:
        model = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
        batch = share(full, world.rank, world.size)
    else:
        batch = full
    loss, (_, reported) = model(batch, 2, torch.Generator().manual_seed(3), itm=itm, mlm_weight=0.5)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in objective.named_parameters() if p.grad is not None}
    return reported, grads


def _rank(rank, size, path, itm, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=size)
    try:
        reported, grads = loss_and_grads(World(rank, size), None, itm)
        if rank == 0:
            torch.save({"loss": reported, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("itm", [True, False], ids=["itm+mlm+fusion", "mlm-only"])
def test_two_gloo_processes_give_the_single_process_loss_and_gradients(tmp_path, itm):
    single_loss, single = loss_and_grads(World(), None, itm)
    out = tmp_path / "rank0.pt"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mp.start_processes(_rank, args=(2, str(tmp_path / "pg"), itm, str(out)), nprocs=2, join=True, start_method="spawn")
    two = torch.load(out, weights_only=True)
    assert two["loss"] == pytest.approx(single_loss, rel=1e-5)
    assert set(two["grads"]) == set(single) and len(single) > 10
    for k, g in single.items():
        # against each tensor's own scale: summed over many positions in another order (two ranks,
        # then the all-reduce), small entries of a big-gradient tensor differ by ~1e-5 of its max;
        # tensors whose gradient is 0 but for rounding (1e-12) meet the 1e-6 floor
        assert (two["grads"][k] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-6, k


def test_distillation_pulls_the_pair_scores_towards_the_teachers():
    """EDJE's distillation term: BCE of each scored pair's logit against the teacher's probability;
    a few steps on it alone bring the student's scores to the teacher's."""
    from training.objectives import EdjeObjective
    adapter, joint, _, _, batch = parts(seed=0)
    t_adapter, t_joint, _, _, _ = parts(seed=5)  # another model of the same shape, frozen
    for p in (*t_adapter.parameters(), *t_joint.parameters()):
        p.requires_grad_(False)
    objective = EdjeObjective(adapter, joint, teacher=(t_adapter.eval(), t_joint.eval()), distill_weight=20.0).eval()
    plain = EdjeObjective(adapter, joint).eval()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        gap = objective(batch, 0, gen())[0] - plain(batch, 0, gen())[0]
    assert gap > 20 * 0.3  # BCE against soft targets: at least their entropy

    def distance():
        with torch.no_grad():
            s = joint(batch.ids, batch.mask, adapter(batch.patch))
            t = t_joint(batch.ids, batch.mask, t_adapter(batch.patch))
        return (torch.sigmoid(s) - torch.sigmoid(t)).abs().mean().item()
    before = distance()
    opt = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(12):  # mostly the distillation term (weight 20)
        opt.zero_grad()
        objective(batch, 0, gen())[0].backward()
        opt.step()
    assert distance() < 0.5 * before, (before, distance())
