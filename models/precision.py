"""Inference precisions: what each needs, what this machine has, and what ``auto`` picks.

* ``fp32``: everywhere; the default of every job (a store's bytes depend on the precision).
* ``bf16``: on a CPU, the model cast to bfloat16 (oneDNN's AMX tiles or AVX-512 bf16 dot products
  underneath), which needs bf16 arithmetic: ``amx_bf16`` or ``avx512_bf16``. On a GPU, torch autocast.
* ``int8``: ONNX Runtime on the CPU (``models.int8``): x86-64 with AVX2, or ARM64.
* ``auto``: the fastest precision measured on this kind of machine (BENCHMARKS.md, "CPU
  precisions"), resolved where the job starts: bf16 on a CPU with bf16 arithmetic, int8 on an
  x86-64 CPU with AVX2 but without it, fp32 otherwise; on a GPU, bf16 for precompute and fp32 for
  rerank (bf16 scoring on a GPU is not measured through the jobs).

The libraries' own switches cap what is used, and the checks here read them, so a capped run is
refused as the capped CPU would be: ``ATEN_CPU_CAPABILITY`` (below ``avx512``: no bf16; ``default``:
no int8) and ``ONEDNN_MAX_CPU_ISA`` (an ISA without bf16: no bf16; without AMX: AVX-512 bf16 only).
"""
import os
import platform
from functools import lru_cache

import torch

PRECISIONS = ("fp32", "bf16", "int8")
CHOICES = PRECISIONS + ("auto",)


class PrecisionUnavailable(RuntimeError):
    """A precision was asked for where it cannot run: the CPU lacks the instructions, a package is
    missing, or the device does not support it. The message says what to use instead."""


@lru_cache(maxsize=1)
def _cpuinfo_fields(*keys) -> dict:
    """The first value of each of ``keys`` in /proc/cpuinfo ({} where there is none)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys and key.strip() not in found:
                    found[key.strip()] = value.strip()
    except OSError:
        pass
    return found


def cpu_flags() -> frozenset:
    """The CPU's feature flags (/proc/cpuinfo on Linux; torch's reading elsewhere)."""
    f = _cpuinfo_fields("flags", "Features")
    if f:
        return frozenset(next(iter(f.values())).split())
    probe = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
             "avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
             "avx512_vnni": "_is_vnni_supported"}
    return frozenset(flag for flag, fn in probe.items() if getattr(torch.cpu, fn, lambda: False)())


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The model name, with the x86 family and model numbers where the name alone is vague
    (cloud VMs often say only "AMD EPYC": family 25 model 17 is Zen 4, 143 with family 6 Sapphire Rapids)."""
    f = _cpuinfo_fields("model name", "Model name", "cpu family", "model")
    name = f.get("model name") or f.get("Model name") or platform.processor() or platform.machine()
    if "cpu family" in f and "model" in f:
        name += f" (family {f['cpu family']} model {f['model']})"
    return name


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "bf16", "asimddp")


def cpu_info() -> dict:
    """What a benchmark or a summary prints about the CPU: model name, the ISA flags that matter
    here, torch's capability reading and the caps in force."""
    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if os.environ.get(k)}
    return {"model": cpu_name(), "machine": platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in ISA_FLAGS if f in cpu_flags()],
            "torch_capability": torch.backends.cpu.get_cpu_capability(), **({"caps": caps} if caps else {})}


def _onednn_cap():
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.upper() if value and value.upper() not in ("ALL", "DEFAULT") else None


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def bf16_support():
    """(ok, what): whether this CPU does bf16 arithmetic, and how ('AMX', 'AVX-512 bf16') or why not."""
    flags = cpu_flags()
    if not _x86():
        ok = "bf16" in flags
        return ok, (f"{platform.machine()} with bf16" if ok else f"{platform.machine()} without bf16")
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False, f"{cpu_name()}: neither amx_bf16 nor avx512_bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.upper().startswith("AVX512"):
        return False, f"capped at {capability} (ATEN_CPU_CAPABILITY)"
    cap = _onednn_cap()
    if cap and not any(k in cap for k in ("BF16", "FP16", "AMX", "AVX10")):
        return False, f"capped at {cap} (ONEDNN_MAX_CPU_ISA)"
    if "amx_bf16" in flags and (cap is None or "AMX" in cap):
        return True, "AMX (amx_bf16)"
    return True, "AVX-512 bf16 (avx512_bf16)"


def int8_support():
    """(ok, what): whether the int8 kernels run well here (models.int8; packages not checked)."""
    from models.int8 import cpu_supports_int8
    return cpu_supports_int8()


def _int8_installed() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require(precision: str, device: str = "cpu", gpu_precisions=("fp32",)) -> None:
    """Raises PrecisionUnavailable, with what to do instead, unless ``precision`` runs on ``device``.
    ``gpu_precisions``: what the calling path offers on a GPU."""
    if precision not in PRECISIONS and precision not in gpu_precisions:
        raise ValueError(f"precision must be one of {list(CHOICES)}, not {precision!r}")
    if device != "cpu":
        if precision == "int8":
            from models.int8 import require_int8
            require_int8(device)
        if precision not in gpu_precisions:
            raise PrecisionUnavailable(f"--precision {precision} is not offered on a GPU here; use one of "
                                       f"{list(gpu_precisions)}")
        if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise PrecisionUnavailable("--precision bf16: this GPU has no bf16; use --precision fp32")
        return
    if precision == "bf16":
        ok, what = bf16_support()
        if not ok:
            raise PrecisionUnavailable(
                f"--precision bf16 needs a CPU with bf16 arithmetic (amx_bf16: Intel Xeon 4th generation or "
                f"newer; avx512_bf16: AMD Zen 4 or newer, Intel Cooper Lake); this one: {what}. Use --precision "
                f"fp32, or auto (the fastest this CPU allows)")
    elif precision == "int8":
        from models.int8 import require_int8
        require_int8(device)
    elif precision not in PRECISIONS:
        raise PrecisionUnavailable(f"--precision {precision} runs on a GPU only; on the CPU use fp32, bf16 or int8")


def resolve(precision: str, device: str = "cpu", job: str = "rerank"):
    """-> (precision to run, why). ``auto`` picks by the measured rule above; anything else is kept
    (and checked by ``require``). ``job``: "rerank" or "precompute"."""
    if precision != "auto":
        return precision, "asked for"
    if device != "cpu":
        if job == "precompute" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "a GPU with bf16: bf16 precompute measured on an H200 (token cosine 0.99993)"
        return "fp32", "a GPU: bf16 scoring is not measured through the jobs"
    ok, what = bf16_support()
    if ok:
        return "bf16", f"bf16 arithmetic: {what}"
    ok8, what8 = int8_support()
    if ok8 and _x86():
        if _int8_installed():
            return "int8", f"no bf16 arithmetic ({what}); int8 on {what8}"
        return "fp32", f"no bf16 arithmetic ({what}); int8 would run but ONNX Runtime is not installed " \
                       f"(pip install 'edje[int8]')"
    return "fp32", f"no bf16 arithmetic ({what}); int8 not measured on {what8}"


class AutocastScorer:
    """``FastScorer``'s interface (``scorer(input_ids, attention_mask, image_tokens, text_index)`` ->
    float32 logits) with its GEMMs in bf16 under torch autocast; LayerNorm and softmax stay fp32.
    Chosen over casting the module, which was 5% faster but further from fp32 (BENCHMARKS.md)."""

    precision = "bf16"

    def __init__(self, fast):
        self.fast = fast
        self.device_type = fast.word.weight.device.type

    def __call__(self, input_ids, attention_mask, image_tokens, text_index=None) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.fast(input_ids, attention_mask, image_tokens, text_index).float()
