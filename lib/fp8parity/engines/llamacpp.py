"""llama.cpp as a candidate: the same GGUF through llama-cpp-python (the optional `[engines]` extra), every op's output
read through llama.cpp's graph-evaluation callback (`cb_eval`) and stored under the workbook's (position, layer, op)
keys, so that stage B's replay and recipe fingerprint judge it like any other trace.

The callback is asked about every graph node; it answers yes only for nodes NODE_OPS maps (and the layers and
positions asked for), so memory stays bounded; for those it copies the data with `ggml_backend_tensor_get`.
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter

import numpy as np
import torch

from fp8parity.errors import WorkbookError
from fp8parity.taps import EMBEDDING, FINAL_NORM, GLOBAL_LAYER, LAYER_OPS, LOGITS, TapKey

# ggml node name (without its "-<layer>" suffix) -> the workbook's op for each occurrence in graph order (None: a node
# of that name the workbook does not read). As llama-cpp-python 0.3.36 builds qwen2 (recorded in
# tests/data/llama_cpp_0.3.36_qwen2_nodes.txt): Qcur and Kcur are named four times in a layer (the matmul, plus the
# bias, reshaped, after RoPE), Vcur three times (the matmul, plus the bias, reshaped). The attention's output
# projection has no name of its own ("node_<n>" between kqv_out and ffn_inp): attn_out is UNMEASURED.
NODE_OPS: dict[str, tuple[str | None, ...]] = {
    "embd": (EMBEDDING,),
    "inp_embd": (EMBEDDING,),  # the same tensor in builds that name it so
    "attn_norm": ("attn_norm",),
    "Qcur": (None, "q_proj", None, "q_post_rope"),
    "Kcur": (None, "k_proj", None, "k_post_rope"),
    "Vcur": (None, "v_proj", None),
    "kqv_out": ("attention",),
    "ffn_inp": ("post_attn_residual",),
    "ffn_norm": ("ffn_norm",),
    "ffn_gate": ("ffn_gate",),
    "ffn_up": ("ffn_up",),
    "ffn_swiglu": ("ffn_swiglu",),
    "ffn_out": ("ffn_out",),
    "l_out": ("post_ffn_residual",),
    "result_norm": (FINAL_NORM,),
    "result_output": (LOGITS,),
}
MAPPED_OPS = {op for ops in NODE_OPS.values() for op in ops if op is not None}
UNMEASURED_OPS = tuple(op for op in LAYER_OPS if op not in MAPPED_OPS)  # listed, never scored (attn_out)
NODE_RE = re.compile(r"^(?P<base>[A-Za-z_]+)(?:-(?P<layer>\d+))?$")
GGML_TYPE_F32 = 0


def node_op(name: str, occurrence: int) -> tuple[str, int] | None:
    """The (op, layer) a ggml node's output is, or None for nodes the workbook does not map."""
    m = NODE_RE.match(name)
    if not m or m["base"] not in NODE_OPS:
        return None
    ops = NODE_OPS[m["base"]]
    if occurrence >= len(ops) or ops[occurrence] is None:
        return None
    return ops[occurrence], int(m["layer"]) if m["layer"] is not None else GLOBAL_LAYER


# the twin of llama.cpp's GEMMs on each device (fp8parity.engines.ggml_twin): its CPU kernels round activations to
# Q8_K / Q8_0; its CUDA kernels to Q8_1 blocks of 32, as MMQ (batches over 8 rows) or MMVQ (up to 8) round them
TWIN_OF_DEVICE = {"cpu": "ggml-q8", "cuda": "ggml-cuda"}
ALL_LAYERS = 999  # n_gpu_layers beyond any model's layer count: every layer and the output offloaded


def _import_llama_cpp():
    try:
        import llama_cpp
        from llama_cpp import _ggml
    except ImportError:
        raise WorkbookError("backend llama.cpp needs llama-cpp-python, which is not installed; run `make engines` "
                            "(builds it from source once, about a quarter of an hour on 2 cores).") from None
    return llama_cpp, _ggml.libggml


def check_device(device: str) -> None:
    """llama-cpp-python importable and, for device cuda, built with GPU offload: else one sentence."""
    L, _ = _import_llama_cpp()
    if device == "cuda" and not L.llama_supports_gpu_offload():
        raise WorkbookError("LLAMA_DEVICE=cuda needs llama-cpp-python built with CUDA, and the one installed was built "
                            "for the CPU; run `make engines CUDA=1` on a machine with the CUDA toolkit.")


class _Tensor(ctypes.Structure):
    """The head of ggml's `struct ggml_tensor`: type, buffer, ne[4] (stable across ggml versions)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


class LlamaCppEngine:
    """The GGUF loaded by llama.cpp, on the CPU or (device cuda, a CUDA build) with every layer on the GPU; `run`
    returns its taps and the logits of every position."""

    def __init__(self, model_path: str, threads: int | None = None, device: str = "cpu", n_ctx: int = 2048,
                 repack: bool = True):
        check_device(device)
        self.L, self.ggml = L, ggml = _import_llama_cpp()
        self.device = device
        ggml.ggml_get_name.restype, ggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        ggml.ggml_nbytes.restype, ggml.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        ggml.ggml_is_contiguous.restype, ggml.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.restype = None
        ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        L.llama_backend_init()
        self._log = L.llama_log_callback(lambda level, text, user: None)  # llama.cpp's load chatter stays quiet
        L.llama_log_set(self._log, ctypes.c_void_p())
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = ALL_LAYERS if device == "cuda" else 0
        mp.use_extra_bufts = repack  # llama.cpp's default: weights repacked for its batched (prefill) CPU kernels
        self.repack = repack
        self.model = L.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise WorkbookError(f"llama.cpp could not load {model_path}; is it a GGUF this build supports?")
        self._callback = L.ggml_backend_sched_eval_callback(self._on_node)  # kept: llama.cpp holds only the pointer
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx  # one prefill is one graph: the callback sees every row at once
        # attention in fp32: llama.cpp's default F16 KV cache (and flash attention) round Q, K, V and the probabilities
        # to fp16, an arithmetic the twin does not model yet; the GEMMs keep llama.cpp's own activation quantization
        cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.op_offload = False  # a CUDA build would otherwise send large CPU matmuls to the GPU: one device per run
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        cp.cb_eval, cp.cb_eval_user_data = self._callback, None
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_ctx = n_ctx
        self._seen: Counter = Counter()
        self._pending: tuple[str, int] | None = None
        self._layers: set[int] | None = None
        self._rows: list[int] = []
        self.taps: dict[TapKey, torch.Tensor] = {}
        self.skipped: Counter = Counter()  # mapped nodes not F32 or not contiguous: not read

    def describe(self) -> dict:
        return {"name": "llama.cpp", "llama_cpp_python": self.L.__version__, "device": self.device,
                "kv_cache": "f32", "flash_attn": False, "repack": self.repack, "twin": self.twin_arithmetic,
                "system_info": self.L.llama_print_system_info().decode().strip()}

    @property
    def twin_arithmetic(self) -> str:
        return TWIN_OF_DEVICE[self.device]

    def _on_node(self, t, ask, _user) -> bool:
        """ggml's eval callback: asked about each node in graph order (answer: do we want it), then called again with
        the computed node for the nodes we wanted."""
        if ask:
            name = self.ggml.ggml_get_name(t).decode(errors="replace")
            self._pending = node_op(name, self._seen[name])
            self._seen[name] += 1
            wanted = self._pending is not None and (self._layers is None or self._pending[1] in self._layers
                                                    or (self._pending[1] == GLOBAL_LAYER and bool(self._layers)))
            return bool(wanted)
        if self._pending is not None:
            self._read(t, *self._pending)
        return True

    def _read(self, t, op: str, layer: int) -> None:
        head = ctypes.cast(t, ctypes.POINTER(_Tensor)).contents
        if head.type != GGML_TYPE_F32 or not self.ggml.ggml_is_contiguous(t):
            self.skipped[op] += 1
            return
        n = self.ggml.ggml_nbytes(t)
        data = np.empty(n // 4, dtype=np.float32)
        self.ggml.ggml_backend_tensor_get(t, data.ctypes.data, 0, n)
        if data.size % len(self._rows):
            self.skipped[op] += 1
            return
        rows = torch.from_numpy(data.reshape(len(self._rows), -1))
        for i, pos in enumerate(self._rows):
            self.taps[(pos, layer, op)] = rows[i]

    def run(self, ids: list[int], path: str = "prefill", layers=None) -> torch.Tensor:
        """One prefill of `ids`, or (path decode) one llama_decode per token through the KV cache; the taps land in
        `self.taps`, the logits of every position are returned (T, vocab)."""
        if len(ids) > self.n_ctx:
            raise WorkbookError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}.")
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        self.taps, self.skipped, self._layers = {}, Counter(), None if layers is None else set(layers)
        logits = []
        chunks = [ids] if path == "prefill" else [[i] for i in ids]
        start = 0
        for chunk in chunks:
            logits.append(self._decode(chunk, start))
            start += len(chunk)
        return torch.cat(logits)

    def _decode(self, chunk: list[int], start: int) -> torch.Tensor:
        L = self.L
        batch = L.llama_batch_init(len(chunk), 0, 1)
        try:
            for k, tok in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = tok, start + k, 1, 1
                batch.seq_id[k][0] = 0
            batch.n_tokens = len(chunk)
            self._seen.clear()
            self._rows = list(range(start, start + len(chunk)))
            if L.llama_decode(self.ctx, batch) != 0:
                raise WorkbookError(f"llama.cpp failed to decode {len(chunk)} token(s) at position {start}.")
        finally:
            L.llama_batch_free(batch)
        out = [np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,)).copy()
               for k in range(len(chunk))]
        return torch.from_numpy(np.stack(out))

    # The calls the stages make of a candidate model (fp8parity.qwen2.Qwen2Model), so that stages A, C and F measure
    # llama.cpp with the same functions as any other candidate.
    backend = None  # no linear backend of the workbook's: nothing to calibrate

    def prefill(self, ids: list[int], recorder=None, logits_for: str = "all") -> torch.Tensor:
        """Logits of one prefill (the last position's with logits_for='last'); no tap is read (the eval callback
        declines every node)."""
        self._layers = set()
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        logits = self._decode(list(ids), 0)
        return logits[-1:] if logits_for == "last" else logits

    def embed(self, ids: list[int]) -> torch.Tensor:
        """The embedding rows llama.cpp reads for `ids` (its `embd` node), (T, hidden)."""
        self.run(ids, "prefill", layers=[0])
        return torch.stack([self.taps[(p, GLOBAL_LAYER, EMBEDDING)] for p in range(len(ids))])

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int] | None, tokenizer=None):
        """Greedy decoding as the reference's generate does it: the prompt's prefill, then one token a step."""
        from fp8parity.qwen2 import GenerationResult

        logits, out, stops, reason = self.prefill(prompt_ids, logits_for="last")[-1], [], set(stop_ids or []), ""
        while not reason:
            out.append(int(torch.argmax(logits)))
            if out[-1] in stops:
                reason = f"stop_token {out[-1]}"
            elif len(out) == max_new_tokens:
                reason = "max_new_tokens"
            else:
                logits = self._decode([out[-1]], len(prompt_ids) + len(out) - 1)[-1]
        return GenerationResult(list(prompt_ids), out, tokenizer.decode(out) if tokenizer else "", reason)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.L.llama_model_free(self.model)
            self.model = None


def write_trace(model_path: str, ids: list[int], path: str, out, prompt: str = "", threads: int | None = None,
                device: str = "cpu", repack: bool = True) -> tuple[dict, torch.Tensor]:
    """llama.cpp's taps of one prompt on one path, saved as a workbook trace judged by stage B against llama.cpp's own
    twin (`ggml-q8` on the CPU, `ggml-cuda` on CUDA); returns (meta, logits of every position)."""
    from fp8parity.trace import save_trace

    engine = LlamaCppEngine(model_path, threads=threads, device=device, n_ctx=max(512, len(ids)), repack=repack)
    try:
        logits = engine.run(ids, path)
        taps = dict(engine.taps)
        meta = {"path": path, "prompt_ids": ids, "prompt": prompt, "side": "candidate", "backend": "llama.cpp",
                "engine": engine.describe(), "twin": {"arithmetic": engine.twin_arithmetic},
                "unmeasured_ops": list(UNMEASURED_OPS), "not_read": dict(engine.skipped)}
    finally:
        engine.close()
    save_trace(out, taps, meta)
    return meta, logits
