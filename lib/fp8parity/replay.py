"""Stage B's local check: every op of a candidate's trace recomputed from the candidate's own traced inputs by a
faithful twin of its recipe (fp8parity.twin), and compared with the candidate's traced output.

Comparing a candidate with the reference mixes the rounding the candidate intends with its bugs; comparing each op
with its twin on the same inputs leaves only what the candidate does differently from a correct implementation of
its own recipe. That local error is judged against the noise floor of its op class: the error measured between two
correct implementations of the same op (FLOORS, each with where its number came from).

Batching is replayed as the candidate ran it: a prefill trace is one forward over every prompt position (so a
per-tensor scale sees the same rows); a decode trace is one forward per position, and its attention reads the
candidate's own K/V of the earlier positions. Where the twin can compute each row as a one-row forward would (every
twin but llama.cpp's: a per-tensor scale is then taken per row), a decode trace's positions are replayed in one batch,
attention still one position at a time: the same numbers up to the order of fp32 sums in the GEMMs (8.5e-7 apart at
most on the real model's FP8 decode trace; tests/test_replay.py holds it within 0.05 of any floor), at the cost of one
forward instead of one a position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from gguf import MODEL_TENSOR

from fp8parity.errors import WorkbookError
from fp8parity.names import OUTPUT, OUTPUT_NORM, TOKEN_EMBD, tensor_name
from fp8parity.qwen2 import Qwen2Model, apply_rope, attention, rms_norm, rope_tables
from fp8parity.taps import EMBEDDING, FINAL_NORM, GLOBAL_LAYER, LAYER_OPS, LINEAR_OPS, LOGITS, TapKey, forward_order

GEMM_OPS = {op: (tap_in, kind, bias) for op, tap_in, kind, bias in LINEAR_OPS}
NORM_OPS = ("attn_norm", "ffn_norm", FINAL_NORM)
# op -> the class whose noise floor judges it; GEMMs take their class from the twin (gemm-fp32/bf16/fp8)
OP_CLASS = {EMBEDDING: "lookup", "attn_norm": "rmsnorm", "ffn_norm": "rmsnorm", FINAL_NORM: "rmsnorm",
            "q_post_rope": "rope", "k_post_rope": "rope", "attention": "attention", "post_attn_residual": "add",
            "post_ffn_residual": "add", "ffn_swiglu": "swiglu"} | dict.fromkeys([*GEMM_OPS, LOGITS], "gemm")


@dataclass(frozen=True)
class Floor:
    rel_l2: float  # largest relative L2 error between two correct implementations of the op class
    source: str  # where the number was measured


# Measured by benchmarks/noise_floors.py on the real default model (Qwen2.5-Coder-0.5B Q4_K_M), 2 chat prompts x both
# paths, largest over every (layer, position); raw numbers in benchmarks/results/noise_floors_*.json. fp32 ops: twice
# the largest error of the fp32 op against the same op in fp64 on the same inputs (two correct fp32 implementations
# each lie within that of the exact result), checked against the GPU candidates' fp32 ops (norms, RoPE, attention
# on the H200) against the CPU twin, all within it but the GPU's fused attention kernel (long prefills), whose largest
# difference from the CPU twin is the attention floor. GEMMs of narrower arithmetic: the largest difference between two
# correct implementations, measured directly on both machines.
_CPU = "2-core x86-64 VM, torch 2.13.0+cpu"
_GPU = "NVIDIA H200, torch 2.11.0+cu130, TE 2.20.2"
FLOORS: dict[str, Floor] = {
    "lookup": Floor(2.0**-24, "a row copy is exact (0 measured everywhere); fp32 unit roundoff as the least floor"),
    "rmsnorm": Floor(3.8e-7, f"2 x 1.88e-7, fp32 vs fp64 ({_CPU}); GPU vs CPU twin at most 3.62e-7 ({_GPU})"),
    "rope": Floor(1.2e-7, f"2 x 6.04e-8, fp32 vs fp64 ({_CPU}); GPU vs CPU twin at most 6.84e-8 ({_GPU})"),
    "attention": Floor(8.0e-5, f"the GPU's fused fp32 kernel (memory-efficient attention, long prefills) vs the CPU "
                               f"twin at most 7.95e-5, run on every forward of 8 GPU candidates ({_GPU}); 2 x 2.40e-5, "
                               f"fp32 vs fp64 ({_CPU}); the GPU's textbook form vs the CPU twin at most 2.96e-5"),
    "add": Floor(1.1e-7, f"2 x 5.35e-8, fp32 vs fp64 ({_CPU}); GPU vs CPU twin 0 ({_GPU})"),
    "swiglu": Floor(2.2e-7, f"2 x 1.08e-7, fp32 vs fp64 ({_CPU}); GPU vs CPU twin at most 1.17e-7 ({_GPU})"),
    "gemm-fp32": Floor(3.6e-6, f"2 x 1.81e-6, fp32 vs fp64 ({_CPU})"),
    "gemm-bf16": Floor(1.6e-3, f"1.54e-3: cuBLAS bf16 GEMM vs the bf16 twin ({_GPU}); bf16 operands with fp32 vs "
                      f"fp64 sums, both rounded to bf16: 1.18e-3 ({_CPU})"),
    "gemm-fp8": Floor(2.4e-3, f"E4M3 GEMMs whose partial sums are promoted to fp32, vs the twin's exact fp32 sums: "
                      f"torch._scaled_mm fast accumulation off 2.08e-3 (tensor) / 1.84e-3 (rowwise), TE block 2.36e-3 "
                      f"({_GPU})"),
    "gemm-ggml-cuda": Floor(3.2e-5, f"2 x 1.57e-5: llama.cpp's CUDA GEMM formulas (activations as its Q8_1 kernels round "
                                    f"them, its fp16 block sums) evaluated in fp32 vs fp64, MMVQ (MMQ: 2.46e-6; {_CPU}; "
                                    f"benchmarks/ggml_cuda_gemm_floor.py)"),
    "gemm-fp8-fast": Floor(1.6e-2, f"E4M3 GEMMs with Hopper's fast (~14-bit) accumulation vs fp32 sums: "
                           f"torch._scaled_mm fast on 1.55e-2, TE current 1.55e-2, delayed-calibrated 1.50e-2 "
                           f"(worst: layer 22 ffn_out, position 0, K=4864; {_GPU}); the CPU model of fast "
                           f"accumulation reaches 3.6e-3"),
}
# llama.cpp's CUDA build compiles with -use_fast_math (approximate expf, sinf/cosf, powf, rsqrtf, division): its fp32
# ops are judged by what a correct fast-math implementation of the same formulas deviates from fp64, measured on the
# GPU by benchmarks/cuda_fast_math_floors.py (raw numbers in benchmarks/results/cuda_fast_math_floors_h200.json)
_FAST = "NVIDIA H200, CUDA 13.0, NVRTC --use_fast_math (CuPy)"
FAST_MATH_FLOORS: dict[str, Floor] = {
    "rope": Floor(3.2e-6, f"2 x 1.55e-6: ggml-cuda's RoPE formula (pos * powf(theta_scale, i), cosf, sinf) with fast "
                          f"math vs fp64 ({_FAST}); without fast math 2.84e-7"),
    "swiglu": Floor(2.6e-7, f"2 x 1.30e-7: x / (1 + expf(-x)) * up with fast math vs fp64 ({_FAST})"),
}
# the prefill's q·kᵀ and p·v with an F32 KV cache: cuBLAS in TF32 (ggml-cuda sets CUBLAS_TF32_TENSOR_OP_MATH);
# measured by benchmarks/tf32_attention_floor.py (raw: benchmarks/results/tf32_attention_floor_h200.json)
TF32_ATTENTION_FLOOR = Floor(5.7e-2, "2 x 2.82e-2 (layer 0; 2.86e-3 at layer 1, 8.8e-4 at layers 22-23): cuBLAS "
                                     "TF32 attention vs fp64 on a prefill's q/k/v (NVIDIA H200, torch 2.11.0+cu130)")


def floors_for(spec, path: str = "decode") -> dict[str, Floor]:
    """The noise floors that judge a trace of `path` replayed through `spec`'s twin."""
    if spec.arithmetic != "ggml-cuda":
        return FLOORS
    floors = FLOORS | FAST_MATH_FLOORS
    return floors | {"attention": TF32_ATTENTION_FLOOR} if path == "prefill" else floors


ALARM_FACTOR = 4.0  # an op diverges when its local error is more than this many times its class's floor


def check_widths(trace: dict[TapKey, torch.Tensor], cfg) -> None:
    """Every tap as wide as the model says (a trace of another model, or a wrong op name, fails in one sentence)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    width = dict.fromkeys(LAYER_OPS, cfg.hidden) | {"q_proj": q, "q_post_rope": q, "attention": q, "k_proj": kv,
                                                        "v_proj": kv, "k_post_rope": kv, "ffn_gate": cfg.ffn,
                                                        "ffn_up": cfg.ffn, "ffn_swiglu": cfg.ffn}
    width |= {EMBEDDING: cfg.hidden, FINAL_NORM: cfg.hidden, LOGITS: cfg.vocab}
    for (pos, layer, op), t in trace.items():
        if op not in width:
            raise WorkbookError(f"trace tap p{pos}.L{layer}.{op} names no op of the forward; ops: {', '.join(width)}.")
        if t.numel() != width[op] or layer >= cfg.n_layers:
            raise WorkbookError(f"trace tap p{pos}.L{layer}.{op} holds {t.numel()} values where {cfg.name} has "
                                f"{width[op]} (and {cfg.n_layers} layers): was the trace made with this model?")


def groups(path: str, positions: list[int], rows_as_forwards: bool = False) -> list[list[int]]:
    """The forwards the candidate ran: prefill is one batch of every position, decode one position a step (or all in
    one batch where the twin computes every row as its own forward: `rows_as_forwards`)."""
    return [positions] if path == "prefill" or rows_as_forwards else [[p] for p in positions]


def _rows_of(trace: dict[TapKey, torch.Tensor], op: str, layer: int, ps: list[int],
          dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    try:
        return torch.stack([trace[(p, layer, op)] for p in ps]).to(dtype)
    except KeyError:
        return None


def _row_errors(cand: torch.Tensor, twin: torch.Tensor) -> dict[str, np.ndarray]:
    """Per row, in float64: relative L2 error, cosine, norm ratio |cand|/|twin|, max abs difference."""
    c, t = cand.double().reshape(cand.shape[0], -1), twin.double().reshape(twin.shape[0], -1)
    nc, nt, nd = c.norm(dim=1), t.norm(dim=1), (c - t).norm(dim=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = torch.where(nt > 0, nd / nt, torch.where(nd > 0, math.inf, 0.0))
        cos = torch.where((nc > 0) & (nt > 0), (c * t).sum(1) / (nc * nt), torch.where(nc == nt, 1.0, 0.0))
        ratio = torch.where(nt > 0, nc / nt, torch.where(nc > 0, math.inf, 1.0))
    finite = torch.isfinite(c).all(1)
    rel = torch.where(finite, rel, math.inf)  # a non-finite output is never within any floor
    return {"rel_l2": rel.numpy(), "cosine": torch.where(finite, cos, math.nan).numpy(),
            "norm_ratio": ratio.numpy(), "max_abs": (c - t).abs().amax(1).numpy()}


class Replayer:
    """Recomputes a trace's ops from their traced inputs: norms, RoPE, attention and SwiGLU in fp32 as the file
    defines them (eps, theta), the linear layers through `twin`, the weights as the file defines them."""

    def __init__(self, model: Qwen2Model, twin, gemm_class: str, floors: dict[str, Floor] | None = None,
                 dtype: torch.dtype = torch.float32, batch_decode: bool = True):
        self.model, self.twin, self.gemm_class, self.dtype = model, twin, gemm_class, dtype  # float64: the exact op
        self.batch_decode = batch_decode  # False: a decode trace replayed one forward a position, as the candidate ran
        self._alone = False  # while a decode trace's positions are replayed in one batch
        self.floors = FLOORS if floors is None else floors
        self.cfg = model.cfg

    def op_class(self, op: str) -> str:
        return self.gemm_class if OP_CLASS[op] == "gemm" else OP_CLASS[op]

    def _gemm(self, op: str, layer: int, x: torch.Tensor, cand: torch.Tensor | None = None) -> torch.Tensor:
        """The twin's GEMM; a twin whose rounding at ties is not determined (llama.cpp's fast-math CUDA quantizer)
        is handed the candidate's rows to choose, at those ties only, the rounding nearer them."""
        m = self.model
        if op == LOGITS:
            w, b, key = m._w(TOKEN_EMBD if self.cfg.tied_embeddings else OUTPUT), None, "lm_head"
        else:
            _, kind, has_bias = GEMM_OPS[op]
            b = m.weights.get(tensor_name(kind, layer, "bias")) if has_bias else None
            w, key = m._w(tensor_name(kind, layer)), f"{layer}.{op}"
        if cand is not None:
            return self.twin.linear_near(x, w, b, key, cand)
        return self.twin.linear(x, w, b, key)

    def _recompute(self, op: str, layer: int, ps: list[int], tr, ids: list[int] | None) -> torch.Tensor | None:
        """The twin's output of `op` at positions `ps` (one forward), from the candidate's traced inputs."""
        cfg, m, dt = self.cfg, self.model, self.dtype
        hd, T = cfg.head_dim, len(ps)
        _rows = partial(_rows_of, dtype=dt)

        prev = (EMBEDDING, GLOBAL_LAYER) if layer == 0 else ("post_ffn_residual", layer - 1)
        if op == EMBEDDING:
            return None if ids is None else m.gguf.rows(TOKEN_EMBD, [ids[p] for p in ps]).to(dt)
        if op in NORM_OPS:
            src = {"attn_norm": prev, "ffn_norm": ("post_attn_residual", layer),
                   FINAL_NORM: ("post_ffn_residual", cfg.n_layers - 1)}[op]
            x = _rows(tr, src[0], src[1], ps)
            w = {"attn_norm": tensor_name(MODEL_TENSOR.ATTN_NORM, layer), "ffn_norm": tensor_name(MODEL_TENSOR.FFN_NORM, layer),
                 FINAL_NORM: OUTPUT_NORM}[op]
            return None if x is None else rms_norm(x, m.weights.get(w).to(dt), cfg.rms_eps)
        if op in GEMM_OPS or op == LOGITS:
            x = _rows(tr, FINAL_NORM if op == LOGITS else GEMM_OPS[op][0], layer, ps)
            cand = _rows(tr, op, layer, ps) if hasattr(self.twin, "linear_near") else None
            return None if x is None else self._gemm(op, layer, x, cand)
        if op in ("q_post_rope", "k_post_rope"):
            x = _rows(tr, op[0] + "_proj", layer, ps)
            if x is None:
                return None
            tables = getattr(self.twin, "rope_tables", rope_tables)  # an engine's twin may form the angles its way
            cos, sin = tables(torch.tensor(ps), hd, cfg.rope_theta, dt, "cpu")
            return apply_rope(x.view(T, -1, hd), cos, sin).reshape(T, -1)
        if op == "attention":
            q = _rows(tr, "q_post_rope", layer, ps)
            seen = list(range(ps[-1] + 1))  # the K/V a correct cache holds: every position up to the last query
            k, v = _rows(tr, "k_post_rope", layer, seen), _rows(tr, "v_proj", layer, seen)
            if q is None or k is None or v is None:
                return None
            kv = cfg.n_kv_heads
            q = q.view(T, cfg.n_heads, hd).transpose(0, 1)
            k, v = k.view(-1, kv, hd).transpose(0, 1), v.view(-1, kv, hd).transpose(0, 1)
            if self._alone:  # decode positions in one batch: each query over its own prefix, as the candidate ran it
                # (one batch with a mask differs by the order of its sums, 2e-5: a quarter of the floor, for nothing)
                out = torch.cat([attention(q[:, t:t + 1], k[:, :p + 1], v[:, :p + 1], p) for t, p in enumerate(ps)], 1)
            else:
                out = attention(q, k, v, ps[0])
            return out.transpose(0, 1).reshape(T, -1)
        if op in ("post_attn_residual", "post_ffn_residual"):
            a = _rows(tr, *prev, ps) if op == "post_attn_residual" else _rows(tr, "post_attn_residual", layer, ps)
            b = _rows(tr, "attn_out" if op == "post_attn_residual" else "ffn_out", layer, ps)
            return None if a is None or b is None else a + b
        if op == "ffn_swiglu":
            g, u = _rows(tr, "ffn_gate", layer, ps), _rows(tr, "ffn_up", layer, ps)
            return None if g is None or u is None else torch.nn.functional.silu(g) * u
        raise KeyError(op)

    def replay(self, trace: dict[TapKey, torch.Tensor], path: str, prompt_ids: list[int] | None = None,
               layers: list[int] | None = None, ops: tuple[str, ...] | None = None) -> pd.DataFrame:
        """One row per (position, layer, op) of the trace: the candidate's output against its twin's."""
        positions = sorted({p for p, _, _ in trace})
        layers = list(range(self.cfg.n_layers)) if layers is None else layers
        plan = [(op, GLOBAL_LAYER) for op in (EMBEDDING,)] + [(op, L) for L in layers for op in LAYER_OPS] + [
            (FINAL_NORM, GLOBAL_LAYER), (LOGITS, GLOBAL_LAYER)]
        plan = [(op, L) for op, L in plan if ops is None or op in ops]
        self._alone = path == "decode" and self.batch_decode and _rows_as_forwards(self.twin, True)
        try:
            return self._replay(trace, path, positions, plan, prompt_ids)
        finally:
            if self._alone:
                _rows_as_forwards(self.twin, False)
            self._alone = False

    def _replay(self, trace, path, positions, plan, prompt_ids) -> pd.DataFrame:
        out = []
        for ps in groups(path, positions, self._alone):
            if hasattr(self.twin, "batch_rows"):  # a twin whose kernel depends on how many rows the candidate's batch had
                self.twin.batch_rows = len(prompt_ids) if path == "prefill" and prompt_ids else len(ps)
            for op, L in plan:
                got = [p for p in ps if (p, L, op) in trace]
                if not got:
                    continue
                twin = self._recompute(op, L, got, trace, prompt_ids)
                cls = self.op_class(op)
                base = {"layer": L, "op": op, "op_class": cls, "floor": self.floors[cls].rel_l2}
                if twin is None:
                    out += [base | {"position": p, "status": "UNMEASURED"} for p in got]
                    continue
                err = _row_errors(_rows_of(trace, op, L, got), twin)
                out += [base | {"position": p, "status": "measured"} | {k: float(v[i]) for k, v in err.items()}
                        for i, p in enumerate(got)]
        df = pd.DataFrame(out)
        if df.empty:
            return df
        df["times_floor"] = df.rel_l2 / df.floor
        return df


def _rows_as_forwards(twin, on: bool) -> bool:
    switch = getattr(twin, "rows_as_forwards", None)  # an engine's twin may not have it: it replays as the engine ran
    return bool(switch(on)) if switch is not None else False


def local_check(model: Qwen2Model, trace: dict[TapKey, torch.Tensor], path: str, prompt_ids: list[int] | None,
                spec, input_scales: dict[str, float] | None = None, layers: list[int] | None = None):
    """A trace replayed through `spec`'s twin and judged by the floors for that twin and path: (local table, the twin
    backend, which counts what it admitted)."""
    from fp8parity import twin

    backend = twin.make_twin(spec, input_scales, model.gguf)
    rp = Replayer(model, backend, spec.gemm_class, floors_for(spec, path))
    return local_table(rp.replay(trace, path, prompt_ids, layers=layers)), backend


def local_table(rows: pd.DataFrame, factor: float = ALARM_FACTOR) -> pd.DataFrame:
    """Per (layer, op) in forward order: the worst position's local error, its multiple of the floor, beyond or not."""
    out = []
    for (layer, op), g in rows.groupby(["layer", "op"], sort=False):
        m = g[g.status == "measured"]
        if m.empty:
            out.append({"layer": layer, "op": op, "op_class": g.op_class.iloc[0], "status": "UNMEASURED"})
            continue
        w = m.loc[m.times_floor.fillna(math.inf).idxmax()]
        out.append({"layer": int(layer), "op": op, "op_class": w.op_class, "status": "measured",
                    "rel_l2": float(w.rel_l2), "floor": float(w.floor), "times_floor": float(w.times_floor),
                    "position": int(w.position), "cosine": float(w.cosine), "norm_ratio": float(w.norm_ratio),
                    "max_abs": float(m.max_abs.max()), "positions": len(m),
                    "beyond": not bool(w.times_floor <= factor)})  # NaN is beyond
    df = pd.DataFrame(out)
    df["order"] = [forward_order(op, L) for L, op in zip(df.layer, df.op, strict=True)]
    return df.sort_values("order").drop(columns="order").reset_index(drop=True)


def worst_row(table: pd.DataFrame) -> pd.Series:
    """The measured (layer, op) of a local table nearest its alarm: the largest multiple of its floor (NaN first)."""
    measured = table[table.status == "measured"]
    return measured.loc[measured.times_floor.fillna(math.inf).idxmax()]


def first_beyond(table: pd.DataFrame) -> dict | None:
    """The first (layer, op) in forward order whose local error is beyond its floor, or None."""
    bad = table[(table.status == "measured") & table.beyond]
    if bad.empty:
        return None
    r = bad.iloc[0]
    return {"layer": int(r.layer), "op": r.op, "position": int(r.position), "rel_l2": float(r.rel_l2),
            "times_floor": float(r.times_floor), "norm_ratio": float(r.norm_ratio), "cosine": float(r.cosine)}


def describe_where(fd: dict, path: str | None = None) -> str:
    where = f"layer {fd['layer']} {fd['op']}" if fd["layer"] >= 0 else fd["op"]
    return (f"{where}{'' if path is None else f', {path} path'}, position {fd['position']}: local error "
            f"{fd['rel_l2']:.3g} = {fd['times_floor']:.3g}× the noise floor (norm ratio {fd['norm_ratio']:.4f})")


FINGERPRINT_LAYERS = (0, 1)  # the GEMMs of the first layers tell recipes apart; more only costs time


def fingerprint(model: Qwen2Model, trace: dict[TapKey, torch.Tensor], path: str, prompt_ids: list[int] | None = None,
                input_scales: dict[str, float] | None = None, layers=FINGERPRINT_LAYERS) -> pd.DataFrame:
    """Which twin explains the trace's GEMMs best: one row per recipe tried, best (lowest mean local error) first."""
    from fp8parity import twin

    layers = [L for L in layers if L < model.cfg.n_layers]
    out, backends = [], {}
    for spec in twin.fingerprint_specs(input_scales):
        # recipes that differ only in the bias share one backend (and its quantized weights)
        key = (spec.arithmetic, spec.granularity)
        if key not in backends:
            backends[key] = twin.make_twin(spec, input_scales, model.gguf)
        backend = backends[key]
        if hasattr(backend, "bias_dtype"):
            backend.bias_dtype = spec.bias
        rp = Replayer(model, backend, spec.gemm_class)
        m = rp.replay(trace, path, prompt_ids, layers=layers, ops=tuple(GEMM_OPS))
        m = m[m.status == "measured"] if len(m) else m
        if m.empty:
            continue
        out.append({"recipe": spec.label(accumulation=False), "mean_local_error": float(m.rel_l2.mean()),
                    "max_local_error": float(m.rel_l2.max()), "gemm_rows": len(m), "spec": spec.to_dict()})
    if not out:
        return pd.DataFrame(columns=["recipe", "mean_local_error", "max_local_error", "gemm_rows", "spec"])
    return pd.DataFrame(out).sort_values(["mean_local_error", "max_local_error"]).reset_index(drop=True)


def describe_fingerprint(fp: pd.DataFrame) -> str:
    """One sentence: this candidate behaves like ..., with the margin to the next recipe and what is left over."""
    if fp.empty:
        return "no GEMM of the trace could be replayed: no fingerprint."
    best = fp.iloc[0]
    from fp8parity import twin
    e = best.mean_local_error
    ties = fp[(fp.mean_local_error == e) & (fp.max_local_error == best.max_local_error)].recipe.tolist()[1:]
    rest = fp.iloc[1 + len(ties):]
    nxt = rest.iloc[0] if len(rest) else None
    margin = "" if nxt is None else (
        f"; next best {nxt.recipe} at {nxt.mean_local_error:.3g}"
        + (f" ({nxt.mean_local_error / e:.3g}× worse)" if e > 0 else " (the best is bit-exact)"))
    if ties:  # e.g. a bias already representable in bf16 rounds to itself: the trace cannot tell these apart
        margin += f"; indistinguishable on this trace from {', '.join(ties)}"
    arith = best.spec["arithmetic"]
    if e == 0:
        acc = "bit-exact with it: fp32 sums in the same order"
    elif arith == "fp8" and best.max_local_error <= FLOORS["gemm-fp8"].rel_l2:
        acc = "within the floor of FP8 GEMMs with fp32 (promoted) accumulation"
    elif arith == "fp8" and best.max_local_error <= FLOORS["gemm-fp8-fast"].rel_l2:
        acc = "beyond fp32 accumulation but within fast (~14-bit) accumulation: it accumulates like Hopper's fast mode"
    elif arith != "fp8" and best.max_local_error <= FLOORS[twin.TwinSpec(**best.spec).gemm_class].rel_l2:
        acc = "within the noise floor of its class: reordered sums"
    else:
        acc = f"not fully explained: the largest residual {best.max_local_error:.3g} exceeds every floor of its class"
    return (f"this candidate behaves like **{best.recipe}** (mean local GEMM error {e:.3g}{margin}); {acc}.")
