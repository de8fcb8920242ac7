"""GGUF tensor names and metadata keys, from gguf-py's constants (MODEL_TENSOR, TENSOR_NAMES, Keys) — never copies."""

from __future__ import annotations

from gguf import MODEL_TENSOR, TENSOR_NAMES, Keys


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, part: str = "weight") -> str:
    """'blk.3.attn_q.weight' for (ATTN_Q, 3); 'token_embd.weight' for TOKEN_EMBD."""
    return f"{TENSOR_NAMES[kind].format(bid=layer)}.{part}"


def arch_key(key: str, arch: str) -> str:
    """An architecture's metadata key: Keys.LLM.BLOCK_COUNT of qwen2 is 'qwen2.block_count'."""
    return key.format(arch=arch)


TOKEN_EMBD = tensor_name(MODEL_TENSOR.TOKEN_EMBD)
OUTPUT_NORM = tensor_name(MODEL_TENSOR.OUTPUT_NORM)
OUTPUT = tensor_name(MODEL_TENSOR.OUTPUT)
TOKENIZER = Keys.Tokenizer
