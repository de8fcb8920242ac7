"""llama.cpp as a candidate: the same GGUF through llama-cpp-python (the optional `[engines]` extra), every op's output
read through llama.cpp's graph-evaluation callback and stored under the workbook's (position, layer, op) keys, so
that stage B's replay and recipe fingerprint judge it like any other trace.

llama.cpp runs in a worker process (`fp8parity.engines.llama_worker`, which never imports torch: a CUDA build of
llama.cpp and PyTorch's CUDA libraries crash in one process); this module is its client.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

from fp8parity.engines.llama_worker import MAPPED_OPS, NODE_OPS, UNMEASURED_OPS, import_llama_cpp, node_op
from fp8parity.errors import WorkbookError
from fp8parity.taps import EMBEDDING, GLOBAL_LAYER, TapKey

__all__ = ["MAPPED_OPS", "NODE_OPS", "UNMEASURED_OPS", "LlamaCppEngine", "check_device", "node_op", "write_trace"]

# the twin of llama.cpp's GEMMs on each device (fp8parity.engines.ggml_twin): its CPU kernels round activations to
# Q8_K / Q8_0; its CUDA kernels to Q8_1 blocks of 32, as MMQ (batches over 8 rows) or MMVQ (up to 8) round them
TWIN_OF_DEVICE = {"cpu": "ggml-q8", "cuda": "ggml-cuda"}


def check_device(device: str) -> None:
    """llama-cpp-python importable and, for device cuda, built with GPU offload: else one sentence."""
    L, _ = import_llama_cpp()
    if device == "cuda" and not L.llama_supports_gpu_offload():
        raise WorkbookError("LLAMA_DEVICE=cuda needs llama-cpp-python built with CUDA, and the one installed was built "
                            "for the CPU; run `make engines CUDA=1` on a machine with the CUDA toolkit.")


# llama_cpp first: with numpy's OpenBLAS loaded before it, a CUDA build crashed loading the model (H200, numpy 2 with
# scipy-openblas; the same crash with torch imported first)
WORKER_BOOT = "import llama_cpp; from fp8parity.engines.llama_worker import main; main()"


class LlamaCppEngine:
    """The GGUF loaded by llama.cpp, on the CPU or (device cuda, a CUDA build) with every layer on the GPU; `run`
    returns its taps and the logits of every position."""

    def __init__(self, model_path: str, threads: int | None = None, device: str = "cpu", n_ctx: int = 2048,
                 repack: bool = True):
        check_device(device)
        self.device, self.repack, self.n_ctx = device, repack, n_ctx
        lib = str(Path(__file__).resolve().parents[2])  # the worker imports fp8parity from where this one came
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (lib, os.environ.get("PYTHONPATH"))))}
        self._proc = subprocess.Popen([sys.executable, "-c", WORKER_BOOT], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)
        self._info = self._call("open", str(model_path), threads, device, n_ctx, repack)
        self.n_vocab = self._info["n_vocab"]
        self.taps: dict[TapKey, torch.Tensor] = {}
        self.skipped: dict[str, int] = {}  # mapped nodes not F32 or not contiguous: not read

    def _call(self, method: str, *args):
        try:
            pickle.dump((method, args), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            code = self._proc.wait()
            raise WorkbookError(f"llama.cpp's worker process ended (exit status {code}) during {method}; its "
                                f"messages are above.") from None
        if status == "error":
            raise WorkbookError(value)
        return value

    def describe(self) -> dict:
        return {"name": "llama.cpp", "llama_cpp_python": self._info["llama_cpp_python"], "device": self.device,
                "kv_cache": "f32", "flash_attn": False, "repack": self.repack, "twin": self.twin_arithmetic,
                "system_info": self._info["system_info"]}

    @property
    def twin_arithmetic(self) -> str:
        return TWIN_OF_DEVICE[self.device]

    def run(self, ids: list[int], path: str = "prefill", layers=None) -> torch.Tensor:
        """One prefill of `ids`, or (path decode) one llama_decode per token through the KV cache; the taps land in
        `self.taps`, the logits of every position are returned (T, vocab)."""
        if len(ids) > self.n_ctx:
            raise WorkbookError(f"{len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}.")
        self._call("clear", None if layers is None else list(layers))
        chunks = [list(ids)] if path == "prefill" else [[i] for i in ids]
        logits, start = [], 0
        for chunk in chunks:
            logits.append(self._decode(chunk, start))
            start += len(chunk)
        taps, self.skipped = self._call("result")
        self.taps = {k: torch.from_numpy(v) for k, v in taps.items()}
        return torch.cat(logits)

    def _decode(self, chunk: list[int], start: int) -> torch.Tensor:
        return torch.from_numpy(self._call("decode", [int(t) for t in chunk], start))

    # The calls the stages make of a candidate model (fp8parity.qwen2.Qwen2Model), so that stages A, C and F measure
    # llama.cpp with the same functions as any other candidate.
    backend = None  # no linear backend of the workbook's: nothing to calibrate

    def prefill(self, ids: list[int], recorder=None, logits_for: str = "all") -> torch.Tensor:
        """Logits of one prefill (the last position's with logits_for='last'); no tap is read (the eval callback
        declines every node)."""
        self._call("clear", [])
        logits = self._decode(list(ids), 0)
        return logits[-1:] if logits_for == "last" else logits

    def embed(self, ids: list[int]) -> torch.Tensor:
        """The embedding rows llama.cpp reads for `ids` (its `embd` node), (T, hidden)."""
        self.run(ids, "prefill", layers=[0])
        return torch.stack([self.taps[(p, GLOBAL_LAYER, EMBEDDING)] for p in range(len(ids))])

    def generation_logits(self, prompt_ids: list[int], forced: list[int], max_new_tokens: int) -> torch.Tensor:
        """The logits `generate` picks its next token from once it has emitted `forced` (the same calls it makes)."""
        logits = self.prefill(prompt_ids, logits_for="last")[-1]
        for k, t in enumerate(forced):
            logits = self._decode([t], len(prompt_ids) + k)[-1]
        return logits

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int] | None, tokenizer=None,
                 keep_logits: bool = False):
        """Greedy decoding as the reference's generate does it: the prompt's prefill, then one token a step."""
        from fp8parity.qwen2 import GenerationResult

        logits, out, stops, reason = self.prefill(prompt_ids, logits_for="last")[-1], [], set(stop_ids or []), ""
        kept = []
        while not reason:
            out.append(int(torch.argmax(logits)))
            if keep_logits:
                kept.append(logits.float().clone())
            if out[-1] in stops:
                reason = f"stop_token {out[-1]}"
            elif len(out) == max_new_tokens:
                reason = "max_new_tokens"
            else:
                logits = self._decode([out[-1]], len(prompt_ids) + len(out) - 1)[-1]
        return GenerationResult(list(prompt_ids), out, tokenizer.decode(out) if tokenizer else "", reason,
                                logits=torch.stack(kept).cpu() if keep_logits else None)

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                self._call("close")
            finally:
                proc.stdin.close()
                proc.wait()
        self._proc = None

    def __del__(self):
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


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
