"""FP8 backends proven on a GPU, in one run (needs CUDA, FP8 (sm_89+) and Transformer Engine).

1. emulated-fp8's quantized operands vs the GPU's, bit for bit (TE's current-scaling quantizer and torch's CUDA cast);
   emulated GEMM outputs vs torch-fp8 and te for the same recipe.
2. te vs torch-fp8 for the same scales.
3. (M, 3584) x (3584, 3584), M in 1, 8, 16, 64, 128: cosine and relative error vs fp64 per recipe / accumulation.
4. Whole-model forward with every linear in FP8 on the GPU (the tiny model), against the CPU reference.
5. Speed: te FP8 vs bf16 GEMM at 7B shapes (TFLOP/s, same run), weights re-quantized per call and cached.

    python benchmarks/gpu_fp8_check.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import traceback

import torch

from fp8parity import fp8, metrics
from fp8parity.backends.emulated import EmulatedFP8Backend
from fp8parity.backends.gpu import TEBackend, TorchFP8Backend, card_name

RESULTS: dict = {}


def section(name):
    def wrap(fn):
        def run(*a, **k):
            print(f"\n== {name}", flush=True)
            try:
                RESULTS[name] = fn(*a, **k)
            except Exception as exc:  # one failing check must not hide the others
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return run
    return wrap


def operands(m: int, k: int = 3584, n: int = 3584, outlier: float = 26.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 408] *= outlier
    w = torch.randn(n, k, generator=g) * 0.02
    return x, w


@section("1. quantized operands bit for bit")
def check_quantization():
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as R

    out = {}
    x, w = operands(64)
    xc, wc = x.cuda(), w.cuda()
    # torch's CUDA cast vs its CPU cast, same scale formula
    s = fp8.scale_from_amax(fp8.amax_tensor(x))
    q_cpu = fp8.quantize(x, s).view(torch.uint8)
    q_gpu = fp8.quantize(xc, s.cuda()).view(torch.uint8).cpu()
    out["torch_cuda_cast_vs_cpu_mismatches"] = int((q_cpu != q_gpu).sum())
    # TE's current-scaling quantizer, taken from a te.Linear after a forward
    lin = te.Linear(3584, 3584, bias=False, params_dtype=torch.float32, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(wc)
        with te.autocast(enabled=True, recipe=R.Float8CurrentScaling()):
            lin(xc)
    for idx, (name, t) in enumerate((("input", x), ("weight", w))):
        qz = lin.quantizers["scaling_fwd"][idx]
        qt = qz(t.cuda())
        te_bytes = qt._data.view(torch.uint8).cpu().reshape(t.shape)
        te_scale_inv = float(qt._scale_inv.reshape(-1)[0])
        s = fp8.scale_from_amax(fp8.amax_tensor(t))
        emu = fp8.quantize(t, s).view(torch.uint8)
        out[f"te_{name}_mismatches"] = int((te_bytes != emu).sum())
        out[f"te_{name}_scale_inv"] = te_scale_inv
        out[f"emulated_{name}_scale_inv"] = float(1.0 / s.reshape(-1)[0])
        out[f"elements_{name}"] = t.numel()
    print(out)
    return out


def _fp64(x, w):
    return (x.double() @ w.double().t())


@section("2. GEMM agreement: emulated vs torch-fp8 vs te (same recipe)")
def check_gemm_agreement():
    out = []
    for m in (16, 128):
        x, w = operands(m, seed=m)
        ref = _fp64(x, w)
        ys = {}
        ys["emulated fp32-acc"] = EmulatedFP8Backend("tensor", "fp32").linear(x, w, None, "g")
        ys["emulated fast-acc"] = EmulatedFP8Backend("tensor", "fast").linear(x, w, None, "g")
        ys["emulated fp64-acc (control)"] = EmulatedFP8Backend("tensor", "fp64").linear(x.double(), w, None, "g").float()
        ys["torch-fp8 tensor"] = TorchFP8Backend("tensor", fast_accum=False).linear(x.cuda(), w.cuda(), None, "g").cpu()
        ys["torch-fp8 tensor fast"] = TorchFP8Backend("tensor", fast_accum=True).linear(x.cuda(), w.cuda(), None, "g").cpu()
        ys["te current"] = TEBackend("current").linear(x.cuda(), w.cuda(), None, "g").cpu()
        base = ys["emulated fp32-acc"]
        for name, y in ys.items():
            row = {"M": m, "path": name, "cos_vs_fp64": metrics.cosine(y, ref), "rel_l2_vs_fp64": metrics.rel_l2(y, ref),
                   "rel_l2_vs_emulated_fp32": metrics.rel_l2(y, base),
                   "rel_l2_vs_torch_fp8": metrics.rel_l2(y, ys["torch-fp8 tensor"])}
            out.append(row)
            print(f"M={m:4d} {name:28s} cos {row['cos_vs_fp64']:.6f} rel {row['rel_l2_vs_fp64']:.5f} "
                  f"vs-emu {row['rel_l2_vs_emulated_fp32']:.2e} vs-torchfp8 {row['rel_l2_vs_torch_fp8']:.2e}")
    return out


@section("2b. fast accumulation model: emulated variants vs cuBLASLt fast accumulation")
def fast_accum_model():
    out = []
    x, w = operands(128, seed=7)
    te_y = TEBackend("current").linear(x.cuda(), w.cuda(), None, "g").cpu()
    fast_y = TorchFP8Backend("tensor", fast_accum=True).linear(x.cuda(), w.cuda(), None, "g").cpu()
    slow_y = TorchFP8Backend("tensor", fast_accum=False).linear(x.cuda(), w.cuda(), None, "g").cpu()
    out.append({"variant": "torch-fp8 no fast accum", "rel_l2_vs_te": metrics.rel_l2(slow_y, te_y),
                "rel_l2_vs_torch_fast": metrics.rel_l2(slow_y, fast_y)})
    for chunk in (32, 64, 128):
        for bits in (10, 11, 12, 13, 14):
            for trunc in (False, True):
                b = EmulatedFP8Backend("tensor", "fast")
                b.fast_chunk, b.fast_bits, b.fast_truncate = chunk, bits, trunc
                y = b.linear(x, w, None, "g")
                out.append({"variant": f"chunk {chunk} bits {bits} {'trunc' if trunc else 'rne'}",
                            "rel_l2_vs_te": metrics.rel_l2(y, te_y), "rel_l2_vs_torch_fast": metrics.rel_l2(y, fast_y)})
    out.sort(key=lambda r: r["rel_l2_vs_torch_fast"])
    for r in out[:8]:
        print(r)
    return out


@section("3. (M, 3584) x (3584, 3584) per recipe vs fp64")
def sweep():
    out = []
    for m in (1, 8, 16, 64, 128):
        x, w = operands(m, seed=100 + m)
        ref = _fp64(x, w)
        paths = {
            "emulated tensor fp32": lambda: EmulatedFP8Backend("tensor", "fp32").linear(x, w, None, "g"),
            "emulated tensor fast": lambda: EmulatedFP8Backend("tensor", "fast").linear(x, w, None, "g"),
            "emulated rowwise fp32": lambda: EmulatedFP8Backend("rowwise", "fp32").linear(x, w, None, "g"),
            "emulated block fp32": lambda: EmulatedFP8Backend("block", "fp32").linear(x, w, None, "g"),
            "torch-fp8 tensor": lambda: TorchFP8Backend("tensor", False).linear(x.cuda(), w.cuda(), None, "g"),
            "torch-fp8 tensor fast": lambda: TorchFP8Backend("tensor", True).linear(x.cuda(), w.cuda(), None, "g"),
            "torch-fp8 rowwise": lambda: TorchFP8Backend("rowwise", False).linear(x.cuda(), w.cuda(), None, "g"),
            "torch-fp8 rowwise fast": lambda: TorchFP8Backend("rowwise", True).linear(x.cuda(), w.cuda(), None, "g"),
            "te current": lambda: TEBackend("current").linear(x.cuda(), w.cuda(), None, "g"),
            "te block": lambda: TEBackend("block").linear(x.cuda(), w.cuda(), None, "g"),
            "te delayed (no_grad, scale 1)": lambda: TEBackend("delayed").linear(x.cuda(), w.cuda(), None, "g"),
            "te delayed-calibrated": lambda: _te_calibrated(x, w),
        }
        for name, fn in paths.items():
            try:
                y = fn().cpu()
                row = {"M": m, "path": name, "cosine": metrics.cosine(y, ref), "rel_l2": metrics.rel_l2(y, ref)}
            except Exception as exc:
                row = {"M": m, "path": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            out.append(row)
            print(row, flush=True)
    return out


def _te_calibrated(x, w):
    b = TEBackend("delayed-calibrated")
    for phase in ("calibrate", "update"):
        b.phase = phase
        b.linear(x.cuda(), w.cuda(), None, "g")
    b.phase = "run"
    return b.linear(x.cuda(), w.cuda(), None, "g")


@section("4. whole-model forward in FP8 on the GPU (tiny model) vs CPU reference")
def whole_model(tiny_path: str):
    from fp8parity.backends import make_backend
    from fp8parity.gguf_file import GGUFModel
    from fp8parity.qwen2 import Qwen2Model
    from fp8parity.tokenizer import GGUFTokenizer

    g = GGUFModel(tiny_path)
    tok = GGUFTokenizer(g)
    ids = tok.chat_ids("What is 2+2?")
    ref = Qwen2Model(g).prefill(ids)
    out = []
    for name, recipe in (("bf16", "current"), ("torch-fp8", "current"), ("torch-fp8", "rowwise"), ("te", "current"),
                         ("te", "block"), ("te", "delayed"), ("emulated-fp8", "current")):
        try:
            y = Qwen2Model(g, backend=make_backend(name, recipe)).prefill(ids).cpu()
            fit = metrics.affine_fit(y[-1], ref[-1])
            cos = min(metrics.cosine(y[i], ref[i]) for i in range(len(ids)))
            row = {"backend": name, "recipe": recipe, "logits_cosine_min": cos,
                   "argmax_agree": float((y.argmax(-1) == ref.argmax(-1)).float().mean()), "slope": fit.slope,
                   "intercept": fit.intercept}
        except Exception as exc:
            row = {"backend": name, "recipe": recipe, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        out.append(row)
        print(row, flush=True)
    return out


@section("5. speed: te FP8 vs bf16 at 7B shapes")
def speed():
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as R

    def bench(fn, iters=50):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2] / 1e3

    out = []
    for (k, n) in ((3584, 3584), (3584, 18944), (18944, 3584)):
        for m in (128, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            lin = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
            wb = lin.weight.detach().clone()
            flops = 2 * m * k * n
            t_bf16 = bench(lambda: x @ wb.t())
            rec = R.Float8CurrentScaling()

            def fp8_requant():
                with torch.no_grad(), te.autocast(enabled=True, recipe=rec):
                    lin(x)

            def fp8_cached():
                with torch.no_grad(), te.autocast(enabled=True, recipe=rec):
                    lin(x, is_first_microbatch=False)

            t_fp8 = bench(fp8_requant)
            with torch.no_grad(), te.autocast(enabled=True, recipe=rec):
                lin(x, is_first_microbatch=True)
            t_cached = bench(fp8_cached)
            row = {"M": m, "K": k, "N": n, "bf16_tflops": flops / t_bf16 / 1e12, "te_fp8_tflops": flops / t_fp8 / 1e12,
                   "te_fp8_cached_weights_tflops": flops / t_cached / 1e12,
                   "fp8_over_bf16": t_bf16 / t_fp8, "fp8_cached_over_bf16": t_bf16 / t_cached}
            out.append(row)
            print({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()}, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_fp8_check.json")
    ap.add_argument("--tiny", default="")
    ap.add_argument("--quick", action="store_true", help="skip the recipe sweep and the speed table")
    args = ap.parse_args()
    import transformer_engine

    RESULTS["card"] = card_name()
    RESULTS["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "te": transformer_engine.__version__}
    print(RESULTS["card"], RESULTS["versions"])
    check_quantization()
    check_gemm_agreement()
    fast_accum_model()
    if not args.quick:
        sweep()
    if args.tiny:
        whole_model(args.tiny)
    if not args.quick:
        speed()
    with open(args.out, "w") as f:
        json.dump(RESULTS, f, indent=2, default=str)


if __name__ == "__main__":
    main()
