"""llama.cpp in a process of its own: the GGUF through llama-cpp-python's C API, every mapped node's output read
through llama.cpp's graph-evaluation callback (`cb_eval`), answered to `fp8parity.engines.llamacpp` over a pipe.

Why a process: a CUDA build of llama.cpp crashes loading a model once torch (or numpy) was imported before it (seen on
the H200), so the worker imports llama_cpp first (`llamacpp.WORKER_BOOT`) and this module never imports torch.

The callback is asked about every graph node; it answers yes only for nodes NODE_OPS maps (and the layers asked for),
so memory stays bounded; for those it copies the data with `ggml_backend_tensor_get`.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import sys
from collections import Counter

import numpy as np

from fp8parity.errors import WorkbookError
from fp8parity.ops import EMBEDDING, FINAL_NORM, GLOBAL_LAYER, LAYER_OPS, LOGITS

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
ALL_LAYERS = 999  # n_gpu_layers beyond any model's layer count: every layer and the output offloaded


def node_op(name: str, occurrence: int) -> tuple[str, int] | None:
    """The (op, layer) a ggml node's output is, or None for nodes the workbook does not map."""
    m = NODE_RE.match(name)
    if not m or m["base"] not in NODE_OPS:
        return None
    ops = NODE_OPS[m["base"]]
    if occurrence >= len(ops) or ops[occurrence] is None:
        return None
    return ops[occurrence], int(m["layer"]) if m["layer"] is not None else GLOBAL_LAYER


def import_llama_cpp():
    try:
        import llama_cpp
        from llama_cpp import _ggml
    except ImportError:
        raise WorkbookError("backend llama.cpp needs llama-cpp-python, which is not installed; run `make engines` "
                            "(builds it from source once, about a quarter of an hour on 2 cores).") from None
    return llama_cpp, _ggml.libggml


class _Tensor(ctypes.Structure):
    """The head of ggml's `struct ggml_tensor`: type, buffer, ne[4] (stable across ggml versions)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


class Session:
    """One model and context: `decode` runs a batch of tokens and returns their logits, reading the taps asked for."""

    def __init__(self, model_path: str, threads: int | None, device: str, n_ctx: int, repack: bool):
        self.L, self.ggml = L, ggml = import_llama_cpp()  # the client checked the build can run on `device`
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
        self._seen: Counter = Counter()
        self._pending: tuple[str, int] | None = None
        self._layers: set[int] | None = set()
        self._rows: list[int] = []
        self.taps: dict[tuple[int, int, str], np.ndarray] = {}
        self.skipped: Counter = Counter()  # mapped nodes not F32 or not contiguous: not read

    def info(self) -> dict:
        return {"llama_cpp_python": self.L.__version__, "n_vocab": self.n_vocab,
                "system_info": self.L.llama_print_system_info().decode().strip()}

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
        for pos, row in zip(self._rows, data.reshape(len(self._rows), -1), strict=True):
            self.taps[(pos, layer, op)] = row

    def clear(self, layers: list[int] | None) -> None:
        """A new sequence: the KV cache emptied, the taps to read from now on (None: every layer)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.taps, self.skipped, self._layers = {}, Counter(), None if layers is None else set(layers)

    def decode(self, chunk: list[int], start: int) -> np.ndarray:
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
        return np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,)).copy()
                         for k in range(len(chunk))])

    def result(self) -> tuple[dict, dict]:
        return self.taps, dict(self.skipped)

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def serve(requests, replies) -> None:
    """Answer (method, args) requests with ("ok", value) or ("error", sentence) until "close"."""
    session = None
    while True:
        try:
            method, args = pickle.load(requests)
        except EOFError:
            return
        try:
            if method == "open":
                session = Session(*args)
                value = session.info()
            else:
                value = getattr(session, method)(*args)
            reply = ("ok", value)
        except WorkbookError as e:
            reply = ("error", str(e))
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()
        if method == "close":
            return


def main() -> None:
    # the protocol owns the process's original stdout; anything a library prints goes to stderr instead
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, replies)

