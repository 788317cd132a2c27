"""int8 CPU inference (``--precision int8``) through ONNX Runtime: the optional extra ``edje[int8]``.

Chosen by measurement (docs/experiments.md, run set R11): on this project's AVX2 CPUs ONNX Runtime's
dynamic int8 kernels beat PyTorch's (``torch.ao`` ``quantize_dynamic``, deprecated, and torchao's
int8 config, which has no fast eager CPU kernel) in speed and fidelity alike.

* Joint encoder: the per-pair layers (the ones that read image tokens) are written, from
  ``FastScorer``'s weights, as an ONNX graph of MatMulInteger and ONNX Runtime's fused ops
  (``MultiHeadAttention``, ``SkipLayerNormalization``, ``BiasGelu``): int8 weights (one scale per
  output channel) and uint8 activations over each pair's own range (``_Graph.linear_int8``), so the
  batch does not set a pair's quantization. Embeddings, the packing and the text-only layers
  (``text_layers``: once per query text, not per pair) stay fp32 in torch.
* Vision encoder (backbone + adapter): exported with ``torch.onnx.export`` and quantized by ONNX
  Runtime's ``quantize_dynamic`` (every MatMul with constant weights; one activation scale per
  tensor, i.e. per batch).

Weights are 7-bit in both: x86 AVX2 without VNNI adds int8 products in int16, which saturates with
full-range weights (token cosine 0.89 vs 0.9996 on a ViT-S here).

Graphs are cached under ``$EDJE_CACHE_DIR`` (default ``~/.cache/edje/int8``), keyed by the
checkpoint fingerprint, this file and the library versions, written atomically: a Beam worker pool
builds each graph once per machine, not once per process.
"""
import contextlib
import hashlib
import io
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.precision import PrecisionUnavailable

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edje[int8]' (onnxruntime, onnx, onnxscript)"
ACTIVATIONS = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu"}


class Int8Unavailable(PrecisionUnavailable):
    """int8 was asked for where it cannot run: missing packages, a GPU device, or a CPU without
    the instructions the int8 kernels need."""


def cpu_supports_int8():
    """(ok, what) for this CPU. x86-64 needs AVX2 (ONNX Runtime's int8 GEMMs; without it they fall
    back to scalar code, slower than fp32); ARM64 always has the NEON dot products. The capability
    is torch's reading of the CPU, so ``ATEN_CPU_CAPABILITY=default`` (torch's own switch) makes
    this check refuse, as on a CPU without AVX2."""
    machine = platform.machine().lower()
    capability = torch.backends.cpu.get_cpu_capability()
    if machine in ("x86_64", "amd64"):
        return capability.upper().startswith(("AVX2", "AVX512")), f"x86-64, {capability}"
    if machine in ("aarch64", "arm64"):
        return True, f"arm64, {capability}"
    return False, f"{machine}, {capability}"


def require_int8(device: str = "cpu"):
    """Raises Int8Unavailable with what to do, unless int8 can run here on ``device``."""
    if device != "cpu":
        raise Int8Unavailable(f"--precision int8 runs on the CPU only (device {device!r}); on a GPU use "
                              f"fp32 (rerank) or bf16/fp16 (precompute)")
    ok, what = cpu_supports_int8()
    if not ok:
        raise Int8Unavailable(f"--precision int8 needs a CPU with AVX2 (x86-64) or an ARM64 CPU; this one is "
                              f"{what}. Use --precision fp32.")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise Int8Unavailable(f"--precision int8 needs ONNX Runtime: {INSTALL_HINT} ({e})") from e


def _cache_path(kind: str, fingerprint: str) -> Path:
    import onnx
    import onnxruntime
    # this file's own bytes are part of the key: a change to the graphs below rebuilds them
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    key = "/".join([code, fingerprint, torch.__version__, onnx.__version__, onnxruntime.__version__])
    root = Path(os.environ.get("EDJE_CACHE_DIR") or Path.home() / ".cache" / "edje") / "int8"
    return root / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.onnx"


@contextlib.contextmanager
def _quiet():
    """The quantizer and the exporter log advice at WARNING on the root logger for every graph."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def cached_model(kind: str, fingerprint: str, build) -> bytes:
    """A graph's bytes, from the cache or from ``build() -> bytes``."""
    path = _cache_path(kind, fingerprint)
    if path.is_file():
        return path.read_bytes()
    with _quiet():
        data = build()
    try:  # a cache that cannot be written (read-only home) only costs a rebuild next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp_path.write_bytes(data)
        os.replace(tmp_path, path)
    except OSError as e:
        log.warning("int8: could not cache %s (%s)", path, e)
    return data


def quantize_dynamic(model) -> bytes:
    """ONNX Runtime's dynamic quantization of every MatMul with constant weights: int8 weights, one
    scale per output channel, 7-bit (see WEIGHT_LEVELS); int8 activations, one scale per tensor."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        ort_quantize(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return dst.read_bytes()


def session(model_bytes: bytes, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- joint encoder
WEIGHT_LEVELS = 63  # 7-bit weights: u8 x s8 pairs summed in int16 (AVX2 without VNNI) cannot saturate


class _Graph:
    """A small ONNX graph builder: weights as initializers, one output per node."""

    def __init__(self):
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.inits, self.nodes = [], []

    def const(self, name, array):
        self.inits.append(self.numpy_helper.from_array(np.require(array, requirements="C"), name))  # keeps 0-d
        return name

    def weight(self, name, t):
        return self.const(name, t.detach().float().cpu().numpy())

    def node(self, op, inputs, output, ms=False, **attrs):
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output,
                                                domain="com.microsoft" if ms else "", **attrs))
        return output

    def linear(self, x, linear, p, int8=True):
        """``linear(x)`` as (y without bias, bias): int8 (``linear_int8``), or a float MatMul (the
        last layer's [CLS]-only tail, one row per pair, where int8 would buy nothing)."""
        if int8:
            return self.linear_int8(x, linear, p)
        return self.node("MatMul", [x, self.weight(p + ".w", linear.weight.T)], p), self.weight(p + ".b", linear.bias)

    def linear_int8(self, x, linear, p, rows="rows"):
        """``linear(x)`` with int8 weights (per output channel) and uint8 activations over each pair's
        own range (one scale and zero point per pair, i.e. per (n, K) input of one sequence): a pair's
        score never depends on the other pairs of its batch. ``rows`` (B, n, 1) is 1 on real rows, 0 on
        the padding, which is left out of the range (padding rows are never read, and how many there
        are depends on the batch). Returns (y without bias, bias)."""
        w = linear.weight.detach().float().cpu()  # (N, K)
        w_scale = (w.abs().amax(1) / WEIGHT_LEVELS).clamp_min(1e-12)
        wq = torch.round(w / w_scale[:, None])  # (N, K) integers in [-63, 63]
        real = self.node("Mul", [x, rows], p + ".real")
        hi = self.node("ReduceMax", [real], p + ".max", axes=[1, 2], keepdims=0)  # (B,)
        lo = self.node("Min", [self.node("ReduceMin", [real], p + ".min0", axes=[1, 2], keepdims=0), "zero_f"],
                       p + ".min")
        hi = self.node("Max", [hi, "zero_f"], p + ".max0")  # the range holds 0, so 0 is exact
        scale = self.node("Max", [self.node("Div", [self.node("Sub", [hi, lo], p + ".range"), "levels"], p + ".s0"),
                                  "tiny"], p + ".scale")
        zp = self.node("Cast", [self.node("Round", [self.node("Div", [self.node("Neg", [lo], p + ".nlo"), scale],
                                                                        p + ".zpf")], p + ".zpr")], p + ".zp", to=2)
        q = self.node("QuantizeLinear", [x, scale, zp], p + ".q", axis=0)  # uint8 (B, n, K)
        y = self.node("MatMulInteger", [q, self.const(p + ".wq", wq.to(torch.int8).T.contiguous().numpy())], p + ".int32")
        # x = scale_b (q - zp_b), W = w_scale_n Wq: x W = w_scale_n scale_b (q Wq - zp_b colsum_n)
        colsum = self.const(p + ".colsum", wq.sum(1).numpy().astype(np.float32))
        offset = self.node("Mul", [self.node("Reshape", [self.node("Cast", [zp], p + ".zpf32", to=1), "b11"], p + ".zp3"),
                                   colsum], p + ".offset")  # (B, 1, N)
        outer = self.node("Mul", [self.node("Reshape", [scale, "b11"], p + ".scale3"),
                                  self.const(p + ".wscale", w_scale.numpy().astype(np.float32))], p + ".outer")
        y = self.node("Sub", [self.node("Cast", [y], p + ".float", to=1), offset], p + ".centred")
        return self.node("Mul", [y, outer], p + ".y"), self.weight(p + ".bias", linear.bias)


def joint_graph(fast):
    """ONNX graph of ``fast``'s joint layers + pooler + head in int8: (x (B, n, h) float, mask (B, n)
    int32) -> logits (B,). The last layer finishes only the [CLS] row, as ``FastScorer`` does; the
    attention itself (scores, softmax) and the small [CLS]-only tail stay float."""
    from onnx import TensorProto
    act_name = fast.hidden_act
    if act_name not in ACTIVATIONS and act_name != "relu":
        raise Int8Unavailable(f"int8: the joint encoder's activation {act_name!r} has no int8 graph")
    g = _Graph()
    g.const("tiny", np.array(1e-8, np.float32))
    g.const("levels", np.array(255, np.float32))
    g.const("zero_f", np.array(0, np.float32))
    g.const("b11", np.array([-1, 1, 1], np.int64))
    g.const("zero", np.array(0, np.int64))
    g.const("start", np.array([0], np.int64))
    g.const("flat", np.array([-1], np.int64))
    g.node("Unsqueeze", [g.node("Cast", ["mask"], "mask.float", to=1), g.const("last_axis", np.array([-1], np.int64))],
           "rows")
    x, top = "x", fast.layers[fast.first_joint_layer:]
    h = fast.pooler.weight.shape[0]
    for i, layer in enumerate(top):
        p = f"layer{i}"
        last = i == len(top) - 1
        qkv, qkv_b = g.linear_int8(x, layer.qkv, p + ".qkv")
        qkv = g.node("Add", [qkv, qkv_b], p + ".qkv.biased")
        g.nodes.append(g.helper.make_node("Split", [qkv], [p + ".q", p + ".k", p + ".v"], name=p + ".split", axis=2))
        q, skip = p + ".q", x
        if last:  # only [CLS] is read after the last layer
            q = g.node("Slice", [q, "start", g.const(p + ".end", np.array([1], np.int64)), g.const(p + ".ax", np.array([1], np.int64))], p + ".q.cls")
            skip = g.node("Slice", [x, "start", p + ".end", p + ".ax"], p + ".x.cls")
        att = g.node("MultiHeadAttention", [q, p + ".k", p + ".v", "", "mask"], p + ".attention", ms=True,
                     num_heads=layer.heads)
        out, out_b = g.linear(att, layer.out, p + ".out", int8=not last)
        x1 = g.node("SkipLayerNormalization", [out, skip, g.weight(p + ".ln1.g", layer.ln1.weight),
                                               g.weight(p + ".ln1.b", layer.ln1.bias), out_b],
                    p + ".ln1", ms=True, epsilon=layer.ln1.eps)
        f1, f1_b = g.linear(x1, layer.fc1, p + ".fc1", int8=not last)
        if act_name == "relu":
            a = g.node("Relu", [g.node("Add", [f1, f1_b], p + ".fc1.biased")], p + ".act")
        else:
            a = g.node(ACTIVATIONS[act_name], [f1, f1_b], p + ".act", ms=True)
        f2, f2_b = g.linear(a, layer.fc2, p + ".fc2", int8=not last)
        x = g.node("SkipLayerNormalization", [f2, x1, g.weight(p + ".ln2.g", layer.ln2.weight),
                                              g.weight(p + ".ln2.b", layer.ln2.bias), f2_b],
                   p + ".ln2", ms=True, epsilon=layer.ln2.eps)
    cls = g.node("Gather", [x, "zero"], "cls", axis=1)
    pooled = g.node("Tanh", [g.node("Gemm", [cls, g.weight("pooler.w", fast.pooler.weight),
                                             g.weight("pooler.b", fast.pooler.bias)], "pooler", transB=1)], "pooled")
    logit = g.node("Gemm", [pooled, g.weight("head.w", fast.head.weight), g.weight("head.b", fast.head.bias)],
                   "head", transB=1)
    g.node("Reshape", [logit, "flat"], "logits")
    H = g.helper
    graph = H.make_graph(g.nodes, "edje_joint_int8",
                         [H.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "n", h]),
                          H.make_tensor_value_info("mask", TensorProto.INT32, ["B", "n"])],
                         [H.make_tensor_value_info("logits", TensorProto.FLOAT, ["B"])], g.inits)
    return H.make_model(graph, opset_imports=[H.make_opsetid("", 17), H.make_opsetid("com.microsoft", 1)])


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside: the float input of the int8 layers must not depend on the
    caller's thread count, or an activation can cross a quantization step (BENCHMARKS.md)."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


class Int8JointScorer:
    """``FastScorer``'s interface (``scorer(input_ids, attention_mask, image_tokens, text_index)`` ->
    logits (B,) float32), with the joint layers in int8 on ONNX Runtime."""

    precision = "int8"

    def __init__(self, fast, fingerprint: str, threads: int = 1):
        self.fast = fast
        self.threads = threads
        self.session = session(cached_model("joint", fingerprint, lambda: joint_graph(fast).SerializeToString()),
                               threads)

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, image_tokens, text_index=None) -> torch.Tensor:
        with one_thread():  # a float GEMM's rounding depends on its thread count (MKL at small M)
            x, keep = self.fast.joint_input(input_ids, attention_mask, image_tokens.float(), text_index)
        out = self.session.run(None, {"x": x.contiguous().numpy(), "mask": keep.to(torch.int32).numpy()})[0]
        return torch.from_numpy(out)


# ---------------------------------------------------------------- vision encoder
def vision_graph(encoder, image_size):
    """ONNX export of backbone + adapter: images (B, 3, H, W) -> (tokens (B, m, h), embedding (B, d))."""
    size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    example = torch.zeros(2, 3, *size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vision.onnx"
        torch.onnx.export(encoder, (example,), str(path), input_names=["images"],
                          output_names=["tokens", "embedding"], dynamic_shapes=({0: "batch"},), dynamo=True,
                          external_data=False)
        import onnx
        return onnx.load(str(path))


class Int8VisionEncoder:
    """``VisionEncoder``'s interface (``encoder(images) -> (tokens, embedding)``, ``.backbone`` for the
    transforms), with backbone + adapter in int8 on ONNX Runtime."""

    precision = "int8"

    def __init__(self, encoder, fingerprint: str, threads: int = 1):
        self.backbone = encoder.backbone
        self.threads = threads
        self.session = session(cached_model(
            "vision", fingerprint, lambda: quantize_dynamic(vision_graph(encoder, encoder.backbone.image_size))), threads)

    def __call__(self, images: torch.Tensor):
        tokens, embedding = self.session.run(None, {"images": images.float().contiguous().cpu().numpy()})
        return torch.from_numpy(tokens), torch.from_numpy(embedding)
