"""The one training loop: seeded, resumable, time- and step-budgeted, early stopping on a validation metric."""
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.distributed import World, broadcast, broadcast_flag

log = logging.getLogger("train")


def cosine_schedule(step, total, warmup, time_fraction=0.0, work=None):
    """Linear warm-up, then cosine decay to 0 by ``total`` steps. ``work(step)``, when given, is
    the work done by then (steps weighted by cost), and the decay follows it instead of the step
    count. ``time_fraction`` (the share of a time budget spent) takes over when it runs ahead, so
    a time-boxed run still ends at a low learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    work = work or (lambda s: s)
    progress = (work(step) - work(warmup)) / max(1e-9, work(total) - work(warmup))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(progress, time_fraction))))


class Trainer:
    """A stage's optimizer, step, best metric and history; its state file ``DIR/state.pt`` (tensors
    only, loaded with weights_only=True) is written by rank 0 only, atomically (temp + rename)."""

    def __init__(self, args, stage_dir: Path, params, lr, max_steps: int, work=None, world: World = World()):
        self.args, self.dir, self.max_steps, self.work, self.world = args, stage_dir, max_steps, work, world
        if world.main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
        self.step, self.best, self.bad_evals, self.history = 0, -1.0, 0, []
        self.counters = {}  # what the data source skipped (bad samples), as of the last save

    def state_path(self):
        return self.dir / "state.pt"

    def save(self, modules):
        if not self.world.main:
            return
        state = {"step": torch.tensor(self.step), "best": torch.tensor(self.best),
                 "bad_evals": torch.tensor(self.bad_evals), "optimizer": self.opt.state_dict(),
                 **{f"module.{k}": m.state_dict() for k, m in modules.items()}}
        tmp = self.state_path().with_suffix(".tmp")
        torch.save(state, tmp)
        _write_atomic(self.dir / "history.json", json.dumps(self.history, indent=1))
        os.replace(tmp, self.state_path())  # last: the state names the step the history is complete to

    def resume(self, modules) -> bool:
        if not self.state_path().exists():
            return False
        state = torch.load(self.state_path(), map_location="cpu", weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[f"module.{k}"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.best = int(state["step"]), float(state["best"])
        self.bad_evals = int(state["bad_evals"])
        if (self.dir / "history.json").exists():
            # records after the saved step (written before a crash) are dropped: they are redone
            self.history = [r for r in json.loads((self.dir / "history.json").read_text()) if r["step"] <= self.step]
        log.info("resumed %s at step %d", self.dir, self.step)
        return True

    def start_clock(self, minutes: float, steps_given: bool):
        """``steps_given``: the stage has its own step budget, and the schedule follows steps alone
        (the time limit then only stops it), so the rates never depend on the machine's speed.
        Otherwise the stage is time-boxed and the schedule also follows the share of time spent."""
        self.started, self.budget, self.timed = time.time(), minutes * 60, not steps_given

    def out_of_time(self) -> bool:
        return broadcast_flag(time.time() - self.started >= self.budget, self.world)

    def set_lr(self, base_lrs):
        time_fraction = (time.time() - self.started) / self.budget if self.timed else 0.0
        time_fraction = broadcast(time_fraction, self.world)  # every rank, one rate
        f = cosine_schedule(self.step, self.max_steps, self.args.warmup, time_fraction, self.work)
        for group, base in zip(self.opt.param_groups, base_lrs):
            group["lr"] = base * f

    def finish(self, best_name: str, out_of_time: bool = False):
        stopped = "steps" if self.step >= self.max_steps else "time" if out_of_time else "plateau"
        if stopped == "time" and not self.timed:
            log.warning("%s stopped by its time limit at step %d of %d: its schedule did not finish, and the "
                        "run is not the seeded one (raise --max_minutes_* or lower the step budget)",
                        self.dir.name, self.step, self.max_steps)
        if self.world.main:
            _write_atomic(self.dir / "done.json", json.dumps({
                "step": self.step, "max_steps": self.max_steps, "stopped": stopped, best_name: self.best,
                "seconds": round(time.time() - self.started, 1), **({"data": self.counters} if self.counters else {})}))

    def after_eval(self, metric, record, modules, counts: bool = True) -> bool:
        """Logs, checkpoints the best, returns True to stop (plateau); on rank 0 (``metric`` None
        elsewhere: the decision is broadcast). ``counts`` False: a warm-up evaluation, recorded
        only (its metric is not the one being trained yet)."""
        stop = False
        if self.world.main:
            record.update(step=self.step, metric=metric, seconds=round(time.time() - self.started, 1))
            if self.counters:
                record["data"] = dict(self.counters)
            self.history.append(record)
            tqdm.write(json.dumps(record))
            if counts and metric is not None and metric > self.best + 1e-4:
                self.best, self.bad_evals = metric, 0
                torch.save({k: m.state_dict() for k, m in modules.items()}, self.dir / "best.pt.tmp")
                os.replace(self.dir / "best.pt.tmp", self.dir / "best.pt")
            elif counts and metric is not None:
                self.bad_evals += 1
            self.save(modules)
            stop = self.bad_evals >= self.args.patience
        return broadcast_flag(stop, self.world)


def fit(trainer: Trainer, name: str, step_fn, eval_fn, every: int, modules, base_lrs, clip_params,
        extra_evals=(), counts=lambda step: True, save_every: int = 0, accumulate: int = 1,
        no_sync=contextlib.nullcontext, counters=None):
    """Runs ``trainer`` to its step budget, time limit or plateau. ``step_fn(step)`` -> (loss tensor
    to backpropagate, loss value to report, postfix dict), called ``accumulate`` times a step (the
    gradients of those batches add up; ``no_sync``: DDP's, so that only the last one communicates);
    ``eval_fn()`` -> (metric, record) on rank 0, at every ``every`` steps, the last step and
    ``extra_evals``; ``save_every``: also save the state between evaluations (for resume);
    ``counters()``: the data source's counts, recorded with each evaluation and in done.json (a
    collective: every rank calls it). Returns True when it ran out of time."""
    world = trainer.world
    bar = tqdm(total=trainer.max_steps, initial=trainer.step, desc=name, dynamic_ncols=True, disable=not world.main)
    out_of_time = False
    window = []  # the losses since the last evaluation: their mean is the curve to compare runs by
    while trainer.step < trainer.max_steps:
        trainer.set_lr(base_lrs)
        trainer.opt.zero_grad(set_to_none=True)
        values = []
        for micro in range(accumulate):
            with no_sync() if micro < accumulate - 1 else contextlib.nullcontext():
                loss, value, postfix = step_fn(trainer.step)
                (loss / accumulate if accumulate > 1 else loss).backward()
            values.append(value)
        value = sum(values) / len(values)
        window.append(value)
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        trainer.opt.step()
        trainer.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", **postfix)
        out_of_time = trainer.out_of_time()
        evaluate = trainer.step % every == 0 or trainer.step == trainer.max_steps or out_of_time or trainer.step in extra_evals
        if counters is not None and (evaluate or (save_every and trainer.step % save_every == 0)):
            trainer.counters = counters()
        if evaluate:
            metric, record = eval_fn() if world.main else (None, None)
            if world.main:
                record["loss"] = round(value, 4)
                record["loss_mean"] = round(sum(window) / len(window), 4)
            window = []
            if trainer.after_eval(metric, record, modules, counts=counts(trainer.step)) or out_of_time:
                break
        elif save_every and trainer.step % save_every == 0:
            trainer.save(modules)
    bar.close()
    return out_of_time


def load_best(stage_dir: Path, modules, keys):
    """The best evaluation's weights of ``keys``, if one was saved."""
    path = stage_dir / "best.pt"
    if not path.exists():
        return False
    best = torch.load(path, map_location="cpu", weights_only=True)
    for k in keys:
        modules[k].load_state_dict(best[k])
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
