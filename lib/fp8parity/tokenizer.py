"""Tokenizer, chat template and stop tokens, all read from the GGUF itself.

The BPE is rebuilt with HF `tokenizers` from the GGUF's vocabulary and merges with the qwen2
pre-tokenizer (the same recipe as transformers' Qwen2Converter); control and user-defined tokens
(GGUF token types 3 and 4) are added as special tokens so `<|im_start|>` is one id. The chat template is
the GGUF's `tokenizer.chat_template`, rendered with jinja2. Stop tokens come from the file: its eos id,
plus `<|im_end|>` / `<|endoftext|>` where the vocabulary has them; nothing is hard-coded by id.
"""

from __future__ import annotations

import jinja2
import numpy as np
from gguf import Keys
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from fp8parity.errors import WorkbookError
from fp8parity.gguf_file import GGUFModel

QWEN2_PRETOKENIZER_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
STOP_TOKEN_TEXTS = ("<|im_end|>", "<|endoftext|>")
GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 3, 4


def _strings(model: GGUFModel, key: str) -> list[str]:
    field = model.reader.fields.get(key)
    if field is None:
        raise WorkbookError(f"{model.path.name} has no {key}; it carries no tokenizer to build from.")
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


class GGUFTokenizer:
    """Encode/decode with the GGUF's own BPE; render its chat template; know its stop tokens."""

    def __init__(self, model: GGUFModel):
        kind = model.meta(Keys.Tokenizer.MODEL)
        if kind != "gpt2":
            raise WorkbookError(f"tokenizer model {kind!r} is not supported; qwen2 GGUFs use 'gpt2' (byte-level BPE).")
        tokens = _strings(model, Keys.Tokenizer.LIST)
        merges = [tuple(m.split(" ", 1)) for m in _strings(model, Keys.Tokenizer.MERGES)]
        types_field = model.reader.fields[Keys.Tokenizer.TOKEN_TYPE]
        types = np.array([int(types_field.parts[i][0]) for i in types_field.data])
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                  end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        special = [tokens[i] for i in np.nonzero((types == GGUF_TOKEN_CONTROL) | (types == GGUF_TOKEN_USER_DEFINED))[0]]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
        self._tok = tok
        self.tokens = tokens
        self.special = {s: vocab[s] for s in special}
        self.chat_template = model.chat_template
        self.eos_id = model.config.eos_id
        self.bos_id = model.config.bos_id
        self.add_bos = bool(model.meta(Keys.Tokenizer.ADD_BOS, False))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise WorkbookError("this GGUF has no tokenizer.chat_template; pass a raw prompt instead of chat messages.")
        # The settings transformers renders chat templates with (trim_blocks drops the newline after a tag).
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
        env.filters.setdefault("tojson", lambda v, indent=None: __import__("json").dumps(v, indent=indent))
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None
        )

    def chat_ids(self, user_prompt: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_prompt}
        ]
        return self.encode(self.render_chat(messages))

    def stop_ids(self) -> list[int]:
        """The GGUF's eos id plus `<|im_end|>` / `<|endoftext|>` where the vocabulary has them."""
        ids = [] if self.eos_id is None else [self.eos_id]
        ids += [self.special[t] for t in STOP_TOKEN_TEXTS if t in self.special]
        return sorted(set(ids))
