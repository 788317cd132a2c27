"""GPU timing of joint-encoder scoring (pairs/s), EDJE vs a BLIP-style baseline.

    python -m bench.gpu_scorer --out DIR [--budget_s 150] [--tiny] [--device cuda|cpu]

Random weights only (BertConfig / open_clip VisionTransformer, nothing downloaded). Paper shape:
MiniLM-L12 (12 layers, hidden 384, 12 heads), 64 visual + 32 text tokens (real text lengths drawn
from 8..32, incl. [CLS]/[SEP]), bf16, large batches; warm-up excluded, timed between
synchronizations. Variants, most important first (the rest is skipped once --budget_s is spent):

  correctness       FastScorer vs JointEncoder max |logit diff| (fp32, bf16, int8 entry)
  hf_bf16           JointEncoder as shipped (HF BertModel, its default attention): the baseline
  fast_eager_bf16   models.fast_scorer.FastScorer, weights cast to bf16
  fast_compile_bf16 the same under torch.compile (default mode), at the best eager batch
  int8_input        int8 tokens + scales in pinned host memory -> device -> dequant -> score,
                    vs float32 tokens from pinned host memory, vs float32 tokens already on device
  blip_style        per pair: ViT-B/16 @384 image tower + 12-layer BERT-base with cross-attention
                    to the patch tokens + ITM head (the issue's baseline)
  demo_*            the demo model's shape (3 layers, m = 16)
  fast_compile_reduce_overhead / fast_compile_max_autotune   other torch.compile modes

Writes DIR/gpu_scorer.json after every variant (a timeout leaves partial results), prints a table.
"""
import argparse
import gc
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from contextlib import contextmanager

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM_L12 = dict(num_hidden_layers=12, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
FULL = dict(shape=MINILM_L12, m=64, t=32, min_len=8, batches=[2048, 4096, 8192],
            demo_shape=dict(MINILM_L12, num_hidden_layers=3), demo_m=16, demo_batch=8192,
            check_batch=256, min_time=1.0,
            vit=dict(image_size=384, patch_size=16, width=768, layers=12, heads=12),
            text_bert=dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
            blip_batches=[128, 256])
TINY = dict(shape=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128),
            m=8, t=16, min_len=4, batches=[8, 32], demo_shape=dict(num_hidden_layers=1, hidden_size=64,
            num_attention_heads=4, intermediate_size=128), demo_m=4, demo_batch=32, check_batch=16, min_time=0.05,
            vit=dict(image_size=64, patch_size=16, width=64, layers=2, heads=2),
            text_bert=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128),
            blip_batches=[4])


class OverBudget(Exception):
    pass


@contextmanager
def deadline(seconds):
    """Raises OverBudget in the main thread after `seconds` (a compile can run for minutes)."""
    def fire(signum, frame):
        raise OverBudget(f"stopped after {seconds:.0f} s: over --budget_s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = TINY if args.tiny else FULL
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.t0 = time.time()
        self.path = os.path.join(args.out, "gpu_scorer.json")
        self.report = {"env": self.env(), "config": dict(self.cfg, compile_backend=args.compile_backend),
                       "budget_s": args.budget_s, "tiny": args.tiny, "results": {}}

    def env(self):
        import transformers
        e = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
             "platform": platform.platform(), "device": str(self.device),
             "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        for mod in ("triton", "open_clip"):
            try:
                e[mod] = __import__(mod).__version__
            except Exception as exc:  # noqa: BLE001 - just a note in the report
                e[mod] = f"unavailable: {exc}"
        if self.cuda:
            e["gpu"] = torch.cuda.get_device_name(self.device)
            e["capability"] = list(torch.cuda.get_device_capability(self.device))
        return e

    def save(self):
        self.report["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.report, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def left(self):
        return self.args.budget_s - (time.time() - self.t0)

    def variant(self, name, fn, need_s=0.0):
        """Runs fn() -> dict under the remaining budget; records the result, an error or a skip."""
        left = self.left()
        if left <= need_s:
            self.report["results"][name] = {"skipped": f"budget: {left:.0f} s left, needs ~{need_s:.0f} s"}
            print(f"[{name}] skipped ({left:.0f} s left)", flush=True)
            self.save()
            return None
        start = time.time()
        print(f"[{name}] ...", flush=True)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with deadline(left), torch.inference_mode():
                out = fn()
        except BaseException as exc:  # noqa: BLE001 - record everything (incl. OverBudget), go on
            if isinstance(exc, KeyboardInterrupt):
                raise
            out = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        out["wall_s"] = round(time.time() - start, 1)
        if self.cuda:
            out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.report["results"][name] = out
        print(f"[{name}] {json.dumps({k: v for k, v in out.items() if k != 'traceback'}, default=str)[:600]}",
              flush=True)
        self.save()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        return out

    # ---- helpers ----
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def pairs_per_s(self, step, batch, warmup=2):
        """Warm-up calls (not timed), one call to size the run, then >= min_time s between syncs."""
        for _ in range(warmup):
            step()
        self.sync()
        t = time.perf_counter()
        step()
        self.sync()
        one = time.perf_counter() - t
        iters = max(3, math.ceil(self.cfg["min_time"] / max(one, 1e-6)))
        t = time.perf_counter()
        for _ in range(iters):
            step()
        self.sync()
        return round(batch * iters / (time.perf_counter() - t), 1)

    def inputs(self, batch, m, hidden, seed=0, device=None):
        """(ids, mask, float32 tokens): text lengths uniform in [min_len, t], [CLS] .. [SEP]."""
        g = torch.Generator().manual_seed(seed)
        t = self.cfg["t"]
        lengths = torch.randint(self.cfg["min_len"], t + 1, (batch,), generator=g)
        ids = torch.randint(1000, 30000, (batch, t), generator=g)
        ids[:, 0] = 101
        ids[torch.arange(batch), lengths - 1] = 102
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        device = self.device if device is None else device
        gd = torch.Generator(device).manual_seed(seed)  # tokens made where they are used (8192 x 64 x 384)
        tokens = torch.randn(batch, m, hidden, generator=gd, device=device)
        return ids.mul(mask).to(device), mask.to(device), tokens

    def joint(self, shape, seed=0):
        """JointEncoder with random weights (no base model, nothing downloaded), fp32, eval, CPU."""
        from models.joint_encoder import MINILM_PACKAGE, JointEncoder, JointEncoderConfig
        torch.manual_seed(seed)
        cfg = JointEncoderConfig(base_model=None, tokenizer=MINILM_PACKAGE,
                                 bert_overrides=dict(shape, vocab_size=30522, max_position_embeddings=512))
        joint = JointEncoder(cfg, load_base_weights=False).eval()
        # BERT's init (std 0.02) makes every logit nearly equal; spread them so diffs mean something
        torch.nn.init.normal_(joint.bert.pooler.dense.weight, std=0.05)
        torch.nn.init.normal_(joint.head.weight, std=0.5)
        return joint

    def fast(self, joint, dtype):
        from models.fast_scorer import FastScorer
        return FastScorer.from_joint_encoder(joint).to(self.device, dtype)

    def sweep(self, model, shape, m, batches):
        out = {}
        for b in batches:
            ids, mask, tok = self.inputs(b, m, shape["hidden_size"])
            out[b] = self.pairs_per_s(lambda: model(ids, mask, tok), b)
        best = max(out, key=out.get)
        return {"pairs_per_s": out, "best_batch": best, "best_pairs_per_s": out[best]}

    def compiled(self, model, mode):
        torch._dynamo.reset()  # each mode compiles from scratch; no stale guards from another variant
        if self.args.compile_backend != "inductor":  # modes are inductor options
            return torch.compile(model, backend=self.args.compile_backend, dynamic=False)
        return torch.compile(model, mode=mode, dynamic=False)

    # ---- variants ----
    def correctness(self):
        c = self.cfg
        joint = self.joint(c["shape"])
        fast32 = self.fast(joint, torch.float32)
        ids, mask, tok = self.inputs(c["check_batch"], c["m"], c["shape"]["hidden_size"], seed=1)
        ref = joint.to(self.device)(ids, mask, tok)
        out = {"logit_std": ref.std().item(), "max_abs_diff_fp32": (fast32(ids, mask, tok) - ref).abs().max().item()}
        from schemas.quantization import dequantize_int8, quantize_int8
        q, s = quantize_int8(tok.cpu().numpy())
        deq = torch.from_numpy(dequantize_int8(q, s)).to(self.device)
        out["max_abs_diff_int8_entry_fp32"] = (fast32.forward_int8(ids.cpu(), mask.cpu(), torch.from_numpy(q),
                                                                   torch.from_numpy(s)) - joint(ids, mask, deq)).abs().max().item()
        fast16 = self.fast(joint, torch.bfloat16)
        got16 = fast16(ids, mask, tok)
        joint16 = joint.to(torch.bfloat16)
        ref16 = joint16(ids, mask, tok)
        out["max_abs_diff_bf16_fast_vs_hf_bf16"] = (got16 - ref16).abs().max().item()
        out["max_abs_diff_bf16_fast_vs_fp32"] = (got16 - ref).abs().max().item()
        out["max_abs_diff_bf16_hf_vs_fp32"] = (ref16 - ref).abs().max().item()
        out["hf_attn_implementation"] = getattr(joint.bert.config, "_attn_implementation", None)
        out["ok_fp32"] = out["max_abs_diff_fp32"] < 1e-3 and out["max_abs_diff_int8_entry_fp32"] < 1e-3
        return out

    def hf(self, shape, m, batches):
        joint = self.joint(shape).to(self.device, torch.bfloat16)
        out = self.sweep(joint, shape, m, batches)
        out["attn_implementation"] = getattr(joint.bert.config, "_attn_implementation", None)
        return out

    def fast_eager(self, shape, m, batches):
        return self.sweep(self.fast(self.joint(shape), torch.bfloat16), shape, m, batches)

    def fast_compile(self, shape, m, batch, mode=None):
        fast = self.fast(self.joint(shape), torch.bfloat16)
        model = self.compiled(fast, mode)
        ids, mask, tok = self.inputs(batch, m, shape["hidden_size"])
        t = time.time()
        model(ids, mask, tok)
        self.sync()
        compile_s = round(time.time() - t, 1)
        diff = (model(ids, mask, tok) - fast(ids, mask, tok)).abs().max().item()
        if mode is None and shape is self.cfg["shape"]:
            self.compiled_default = (fast, model, batch)  # reused by int8_input: no second compile
        return {"mode": mode or "default", "batch": batch, "compile_s": compile_s, "max_abs_diff_vs_eager": diff,
                "pairs_per_s": self.pairs_per_s(lambda: model(ids, mask, tok), batch)}

    def int8_input(self, shape, m, batch):
        """Per batch: host (pinned) -> device copy + scoring, int8 vs float32 tokens."""
        from schemas.quantization import quantize_int8
        fast, model, batch = getattr(self, "compiled_default", (None, None, batch))
        use_compiled = model is not None
        if not use_compiled:
            fast = model = self.fast(self.joint(shape), torch.bfloat16)
        ids, mask, tok = self.inputs(batch, m, shape["hidden_size"], device="cpu")
        q, s = quantize_int8(tok.numpy())
        pin = (lambda x: x.pin_memory()) if self.cuda else (lambda x: x)
        h_ids, h_mask, h_q, h_s, h_tok = (pin(x) for x in (ids, mask, torch.from_numpy(q), torch.from_numpy(s), tok))
        d_ids, d_mask, d_tok = (x.to(self.device) for x in (ids, mask, tok))
        out = {"batch": batch, "compiled": use_compiled,
               "host_bytes_per_pair": {"int8": q[0].nbytes + s[0].nbytes, "fp32": tok[0].numel() * 4}}
        out["int8_pinned_host_pairs_per_s"] = self.pairs_per_s(
            lambda: model(*fast.prepare_int8(h_ids, h_mask, h_q, h_s)), batch)
        out["fp32_pinned_host_pairs_per_s"] = self.pairs_per_s(
            lambda: model(*(x.to(self.device, non_blocking=True) for x in (h_ids, h_mask, h_tok))), batch)
        out["fp32_on_device_pairs_per_s"] = self.pairs_per_s(lambda: model(d_ids, d_mask, d_tok), batch)
        return out

    def blip_style(self):
        """BLIP-style ITM: every pair runs the image tower, then a cross-attending text encoder."""
        from open_clip.transformer import VisionTransformer
        from transformers import BertConfig, BertModel
        c = self.cfg
        torch.manual_seed(0)
        vit = VisionTransformer(mlp_ratio=4.0, output_tokens=True, **c["vit"]).eval()
        # HF only builds cross-attention layers for a decoder (is_decoder=True: causal self-attention
        # over the 32 text tokens, the same FLOPs as BLIP's bidirectional one); use_cache off
        bcfg = BertConfig(vocab_size=30522, max_position_embeddings=512, is_decoder=True, add_cross_attention=True,
                          use_cache=False, **c["text_bert"])
        text = BertModel(bcfg, add_pooling_layer=False).eval()
        itm = torch.nn.Linear(bcfg.hidden_size, 2)
        if c["vit"]["width"] != bcfg.hidden_size:  # tiny only: BLIP's widths match (768)
            proj = torch.nn.Linear(c["vit"]["width"], bcfg.hidden_size)
        else:
            proj = torch.nn.Identity()
        vit, text, itm, proj = (x.to(self.device, torch.bfloat16) for x in (vit, text, itm, proj))

        def make(batch):
            ids, mask, _ = self.inputs(batch, 1, 1)
            img = torch.randn(batch, 3, c["vit"]["image_size"], c["vit"]["image_size"], device=self.device,
                              dtype=torch.bfloat16)

            def step():
                _, patches = vit(img)  # (B, n_patches, width)
                h = text(input_ids=ids, attention_mask=mask, encoder_hidden_states=proj(patches)).last_hidden_state
                return itm(h[:, 0])[:, 1].float()
            return step

        res = {b: self.pairs_per_s(make(b), b) for b in c["blip_batches"]}
        best = max(res, key=res.get)
        return {"pairs_per_s": res, "best_batch": best, "best_pairs_per_s": res[best],
                "attn_implementation": getattr(text.config, "_attn_implementation", None)}

    def run(self):
        c, r = self.cfg, self.report["results"]
        print(f"device {self.device}, budget {self.args.budget_s} s", flush=True)
        self.variant("correctness", self.correctness)
        self.variant("hf_bf16", lambda: self.hf(c["shape"], c["m"], c["batches"]))
        self.variant("fast_eager_bf16", lambda: self.fast_eager(c["shape"], c["m"], c["batches"]))
        best_batch = r.get("fast_eager_bf16", {}).get("best_batch", c["batches"][1])
        self.variant("fast_compile_bf16", lambda: self.fast_compile(c["shape"], c["m"], best_batch))
        self.variant("int8_input", lambda: self.int8_input(c["shape"], c["m"], best_batch))
        self.variant("blip_style", self.blip_style)
        self.variant("demo_hf_bf16", lambda: self.hf(c["demo_shape"], c["demo_m"], [c["demo_batch"]]))
        self.variant("demo_fast_eager_bf16", lambda: self.fast_eager(c["demo_shape"], c["demo_m"], [c["demo_batch"]]))
        self.variant("demo_fast_compile_bf16", lambda: self.fast_compile(c["demo_shape"], c["demo_m"], c["demo_batch"]))
        if self.cuda or self.args.tiny:  # CUDA graphs / Triton GEMM autotuning are CUDA things
            self.variant("fast_compile_reduce_overhead",
                         lambda: self.fast_compile(c["shape"], c["m"], best_batch, "reduce-overhead"), need_s=30)
            self.variant("fast_compile_max_autotune",
                         lambda: self.fast_compile(c["shape"], c["m"], best_batch, "max-autotune-no-cudagraphs"),
                         need_s=60)
        self.summarize()
        self.save()
        self.print_table()

    def summarize(self):
        r = self.report["results"]

        def rate(name):
            v = r.get(name, {})
            return v.get("best_pairs_per_s") or (v.get("pairs_per_s") if isinstance(v.get("pairs_per_s"), float) else None)
        edje = {n: rate(n) for n in ("hf_bf16", "fast_eager_bf16", "fast_compile_bf16", "fast_compile_reduce_overhead",
                                     "fast_compile_max_autotune")}
        edje = {n: v for n, v in edje.items() if v}
        s = {}
        if edje:
            best = max(edje, key=edje.get)
            s.update(edje_best=best, edje_best_pairs_per_s=edje[best])
            if edje.get("hf_bf16"):
                s["speedup_vs_hf"] = round(edje[best] / edje["hf_bf16"], 2)
            if rate("blip_style"):
                s["blip_style_pairs_per_s"] = rate("blip_style")
                s["edje_best_over_blip_style"] = round(edje[best] / rate("blip_style"), 1)
            s["target_120k_met"] = edje[best] >= 120_000 if not self.args.tiny else None
        # measured elsewhere (the issue), H100, MiniLM-L12 64+32 bf16: for reading the numbers above
        s["issue_reference_pairs_per_s"] = {"nn.TransformerEncoder": 65_600, "hf_bert_sdpa": 56_600,
                                            "hand_written_blocks_compile": 71_500, "blip_style": 2_300}
        self.report["summary"] = s

    def print_table(self):
        print(f"\n{'variant':32s} {'batch':>6s} {'pairs/s':>12s}  notes")
        for name, v in self.report["results"].items():
            if "skipped" in v or "error" in v:
                print(f"{name:32s} {'':>6s} {'':>12s}  {v.get('skipped') or v.get('error')[:120]}")
            elif isinstance(v.get("pairs_per_s"), dict):
                for b, p in v["pairs_per_s"].items():
                    print(f"{name:32s} {b:>6} {p:>12,.0f}  {v.get('attn_implementation') or ''}")
            elif isinstance(v.get("pairs_per_s"), float):
                print(f"{name:32s} {v['batch']:>6} {v['pairs_per_s']:>12,.0f}  compile {v['compile_s']} s, "
                      f"diff vs eager {v['max_abs_diff_vs_eager']:.2g}")
            elif name == "int8_input":
                for k in ("int8_pinned_host", "fp32_pinned_host", "fp32_on_device"):
                    print(f"{name + ':' + k:32s} {v['batch']:>6} {v[k + '_pairs_per_s']:>12,.0f}  "
                          f"{'compiled' if v['compiled'] else 'eager'}")
            else:
                print(f"{name:32s} " + ", ".join(f"{k}={x:.3g}" if isinstance(x, float) else f"{k}={x}"
                                                 for k, x in v.items() if k != "traceback"))
        print("summary:", json.dumps(self.report.get("summary", {})))
        print(f"wrote {self.path} ({self.report['elapsed_s']} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget_s", type=float, default=150.0, help="skip/stop variants after this many seconds")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the whole script in seconds on a CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile_backend", default=None,
                   help="torch.compile backend; default inductor (aot_eager for --tiny on a CPU: no C++ builds)")
    args = p.parse_args(argv)
    if args.compile_backend is None:
        cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
        args.compile_backend = "aot_eager" if args.tiny and cpu else "inductor"
    os.makedirs(args.out, exist_ok=True)
    Bench(args).run()


if __name__ == "__main__":
    main()
