"""Open and validate a GGUF file: model config, tokenizer data, and lazily dequantized tensors.

Reading is gguf-py's GGUFReader (memory-mapped); validation adds the checks a user needs when the
file is wrong: not a GGUF, truncated, another architecture, an unsupported quant type, a missing
tensor. Each is a WorkbookError with one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, Keys
from gguf import MODEL_TENSOR as T

from fp8parity.dequant import SUPPORTED_TYPES, dequantize, dequantize_rows
from fp8parity.errors import WorkbookError
from fp8parity.names import OUTPUT, OUTPUT_NORM, TOKEN_EMBD, arch_key, tensor_name

SUPPORTED_ARCHITECTURES = ("qwen2",)
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a qwen2 model, as read from GGUF metadata."""

    architecture: str
    name: str
    n_layers: int  # transformer blocks
    hidden: int  # residual stream width
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention)
    ffn: int  # SwiGLU inner width
    vocab: int  # rows of token_embd
    rms_eps: float  # RMSNorm epsilon (1e-6 for Qwen2.5)
    rope_theta: float  # RoPE base frequency
    context: int  # trained context length
    tied_embeddings: bool  # no output.weight: the LM head reuses token_embd
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    file_type: int | None  # llama.cpp's LLAMA_FTYPE (15 = Q4_K_M)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self) | {"head_dim": self.head_dim}


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor's data lies inside the file before mapping it.

    It also keeps the mapping as a plain ndarray view: gguf-py slices `self.data` once per string of
    the vocabulary, and np.memmap's per-slice bookkeeping made opening a Qwen file take ~7 s instead of ~1 s.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)  # still backed by the mmap (kept alive as .base)

    def _get_field_parts(self, orig_offs: int, raw_type: int):  # noqa: ANN202 - gguf-py's signature
        """gguf-py's, with a fast path for flat arrays of strings or scalars, returning the same parts and indices.

        gguf-py reads each element through `_get` (455k calls for the tokenizer's 151k tokens, 151k merges and 151k
        types: 2.7 s of a 3 s open); here an element is a slice of the mapping (tests/test_gguf_file.py compares every
        field with gguf-py's own reader)."""
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        itype, n, offs, data = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12, self.data
        parts: list[np.ndarray] = [raw_itype, alen]
        if itype == GGUFValueType.STRING:  # each element: its uint64 length, then its bytes
            raw = memoryview(data)
            for _ in range(n):
                size = int.from_bytes(raw[offs:offs + 8], "little")
                parts += (data[offs:offs + 8].view(np.uint64), data[offs + 8:offs + 8 + size])
                offs += 8 + size
            idxs = list(range(3, 3 + 2 * n, 2))
        elif itype in self.gguf_scalar_to_np:
            dtype = np.dtype(self.gguf_scalar_to_np[itype])
            whole = data[offs:offs + n * dtype.itemsize].view(dtype)
            parts += (whole[i:i + 1] for i in range(n))
            offs += n * dtype.itemsize
            idxs = list(range(2, 2 + n))
        else:  # arrays of arrays: gguf-py's own way
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, parts, idxs, [GGUFValueType.ARRAY] + ([itype] if n else [])

    def _build_tensors(self, start_offs, fields):  # noqa: ANN001 - gguf-py's signature
        size = len(self.data)
        for field in fields:
            _nl, name_data, _nd, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise WorkbookError(
                    f"tensor {name} has unknown GGML type id {int(raw_dtype[0])}; this file needs a newer "
                    f"reader or is corrupt."
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise WorkbookError(
                    f"the file is truncated: tensor {name} needs bytes up to {end:,} but the file has "
                    f"{size:,} bytes; download it again."
                )
        super()._build_tensors(start_offs, fields)


def _field_value(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class GGUFModel:
    """A qwen2 GGUF file: config, tokenizer fields, and tensors dequantized on demand to float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise WorkbookError(f"no model file at {self.path}; run `make model` or pass MODEL=path/to/model.gguf.")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise WorkbookError(
                f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model."
            )
        try:
            self.reader = _CheckedReader(self.path)
        except WorkbookError:
            raise
        except Exception as exc:  # gguf-py raises bare ValueError/IndexError on damaged headers
            raise WorkbookError(
                f"{self.path} has a damaged GGUF header ({type(exc).__name__}: {exc}); download it again."
            ) from None
        arch = _field_value(self.reader, Keys.General.ARCHITECTURE)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise WorkbookError(
                f"{self.path.name} is a {arch!r} model; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise WorkbookError(
                    f"tensor {t.name} is quantized as {t.tensor_type.name}, which is not supported; "
                    f"supported: {', '.join(SUPPORTED_TYPES)}."
                )
        self.config = self._read_config(arch)
        for name in self.required_tensor_names():
            if name not in self.tensors:
                raise WorkbookError(f"{self.path.name} lacks tensor {name}, which a {arch} model needs.")

    # --- metadata -------------------------------------------------------------------------------
    def meta(self, key: str, default=None):
        return _field_value(self.reader, key, default)

    def _read_config(self, arch: str) -> ModelConfig:
        def need(key: str):
            v = self.meta(arch_key(key, arch))
            if v is None:
                raise WorkbookError(f"{self.path.name} lacks metadata key {arch_key(key, arch)}; the file is incomplete.")
            return v

        n_heads = int(need(Keys.Attention.HEAD_COUNT))
        embd = self.reader.fields.get(Keys.Tokenizer.LIST)
        vocab = len(embd.data) if embd is not None else int(self.tensors[TOKEN_EMBD].shape[1])
        return ModelConfig(
            architecture=arch,
            name=str(self.meta(Keys.General.NAME, self.path.stem)),
            n_layers=int(need(Keys.LLM.BLOCK_COUNT)),
            hidden=int(need(Keys.LLM.EMBEDDING_LENGTH)),
            n_heads=n_heads,
            n_kv_heads=int(self.meta(arch_key(Keys.Attention.HEAD_COUNT_KV, arch), n_heads)),
            ffn=int(need(Keys.LLM.FEED_FORWARD_LENGTH)),
            vocab=vocab,
            rms_eps=float(need(Keys.Attention.LAYERNORM_RMS_EPS)),
            rope_theta=float(self.meta(arch_key(Keys.Rope.FREQ_BASE, arch), 10000.0)),
            context=int(self.meta(arch_key(Keys.LLM.CONTEXT_LENGTH, arch), 32768)),
            tied_embeddings=OUTPUT not in self.tensors,
            bos_id=self._opt_int(Keys.Tokenizer.BOS_ID),
            eos_id=self._opt_int(Keys.Tokenizer.EOS_ID),
            pad_id=self._opt_int(Keys.Tokenizer.PAD_ID),
            file_type=self._opt_int(Keys.General.FILE_TYPE),
        )

    def _opt_int(self, key: str) -> int | None:
        v = self.meta(key)
        return None if v is None else int(v)

    @property
    def chat_template(self) -> str | None:
        return self.meta(Keys.Tokenizer.CHAT_TEMPLATE)

    def required_tensor_names(self) -> list[str]:
        weights = [T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN]
        biases = [T.ATTN_Q, T.ATTN_K, T.ATTN_V]  # qwen2's q/k/v have biases
        names = [TOKEN_EMBD, OUTPUT_NORM]
        for i in range(self.config.n_layers):
            names += [tensor_name(k, i) for k in weights] + [tensor_name(k, i, "bias") for k in biases]
        return names

    # --- tensors --------------------------------------------------------------------------------
    def _get(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise WorkbookError(f"{self.path.name} has no tensor {name}.") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """torch order: (rows, cols) = reversed GGUF dims; a Linear weight is (out, in)."""
        return tuple(int(d) for d in reversed(self._get(name).shape.tolist()))

    def qtype(self, name: str) -> str:
        return self._get(name).tensor_type.name

    def fp32_bytes(self) -> int:
        """What every tensor of the file takes dequantized to float32."""
        return sum(int(t.n_elements) * 4 for t in self.tensors.values())

    def tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantize a whole tensor to float32 (into `out` if given, a reusable buffer)."""
        t = self._get(name)
        flat = dequantize(t.data, t.tensor_type, int(t.n_elements), out=out, tensor_name=name)
        return flat.view(self.shape(name))

    def rows(self, name: str, ids: list[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Dequantize only the given rows of a 2-D tensor (an embedding lookup without the whole table)."""
        t = self._get(name)
        n_rows, row_len = self.shape(name)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            raise WorkbookError(f"token id out of range for {name}: ids must lie in [0, {n_rows}).")
        raw = t.data if t.tensor_type.name not in ("F32", "F16", "BF16") else t.data.reshape(n_rows, row_len)
        return dequantize_rows(raw, t.tensor_type, row_len, ids)

    # --- identity -------------------------------------------------------------------------------
    @cached_property
    def sha256(self) -> str:
        """sha256 of the whole file, cached beside the user's cache dir keyed by (path, size, mtime)."""
        st = self.path.stat()
        cache = Path(os.environ.get("FP8PARITY_CACHE", Path.home() / ".cache" / "fp8parity")) / "sha256.json"
        key = f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        known = {}
        if cache.is_file():
            try:
                known = json.loads(cache.read_text())
            except (OSError, ValueError):
                known = {}
        if key in known:
            return known[key]
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        digest = h.hexdigest()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            known[key] = digest
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home only costs a re-hash next time
        return digest

    def tensor_type_counts(self) -> dict[str, int]:
        return dict(Counter(t.tensor_type.name for t in self.reader.tensors).most_common())

    def special_tokens(self) -> dict[str, int]:
        """Control / user-defined tokens (GGUF token types 3 and 4) by text."""
        toks = self.reader.fields.get(Keys.Tokenizer.LIST)
        types = self.reader.fields.get(Keys.Tokenizer.TOKEN_TYPE)
        if toks is None or types is None:
            return {}
        tt = np.array([int(types.parts[i][0]) for i in types.data])
        out = {}
        for i in np.nonzero((tt == 3) | (tt == 4))[0]:
            out[bytes(toks.parts[toks.data[int(i)]]).decode("utf-8", "replace")] = int(i)
        return out

    def card(self) -> dict:
        """What `make inspect` prints."""
        return {
            "file": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "sha256": self.sha256,
            "gguf_version": int(self.meta("GGUF.version", 0)),
            "config": self.config.to_dict(),
            "tensors": len(self.tensors),
            "tensor_types": self.tensor_type_counts(),
            "special_tokens": self.special_tokens(),
            "has_chat_template": self.chat_template is not None,
        }
