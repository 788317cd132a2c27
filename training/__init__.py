"""Training EDJE's adapter + joint encoder (and the demo's backbone): data, objectives, loop, evaluation.

``pipeline.train`` is the job; this package holds its parts, one small module each:

- ``scenes``: the scenes benchmark in memory (scene groups, near-neighbour batches);
- ``stream``: image-caption WebDataset shards streamed through DataLoader workers;
- ``batches``: the batch every objective reads, from either source, with the frozen backbone run online;
- ``objectives``: the clip stage's contrastive loss and EDJE's listwise ITM + MLM, data parallel;
- ``loop``: the one training loop (schedule, budgets, checkpoints, resume);
- ``evaluation``: held-out checks (scene groups, grounding, recall@k first stage vs reranked);
- ``build``: the adapter and joint encoder a run trains;
- ``distributed``: torchrun process groups and the collectives the objectives need;
- ``clip_stage`` / ``edje_stage``: the two stages, wired from the above.
"""
