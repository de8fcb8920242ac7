"""The CPU reference: internal consistency on the tiny model, and agreement with transformers' Qwen2
loaded from the same real GGUF (an independent implementation)."""

from __future__ import annotations

import pytest
import torch

from fp8parity.backends import ReferenceBackend
from fp8parity.qwen2 import ForwardOptions, Qwen2Model, apply_rope, quantize_q8_k, rope_tables, rotate, rotation_sin
from fp8parity.taps import ALL_OPS, LAYER_OPS, Recorder
from fp8parity.tokenizer import GGUFTokenizer

PROMPTS = ["What is 2+2?", "Write a Python function that reverses a string.", "Explain RMSNorm in one sentence."]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


def test_prefill_and_serial_decode_agree(tiny):
    m = Qwen2Model(tiny)
    ids = GGUFTokenizer(tiny).chat_ids("What is 2+2?")
    a, b = m.run(ids, "prefill"), m.run(ids, "decode")
    assert a.shape == b.shape == (len(ids), tiny.config.vocab)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_fp32_agrees_with_fp64(tiny):
    ids = GGUFTokenizer(tiny).chat_ids("hello")
    a = Qwen2Model(tiny).prefill(ids)
    b = Qwen2Model(tiny, dtype=torch.float64).prefill(ids)
    assert b.dtype == torch.float64
    assert cosine(a, b) > 0.999999 and (a.double() - b).abs().max() < 1e-3


def test_taps_cover_every_op_in_order(tiny):
    ids = GGUFTokenizer(tiny).encode("def f(x): return x")
    rec = Recorder()
    Qwen2Model(tiny).prefill(ids, rec)
    ops = {s for _, _, s in rec.tensors}
    assert ops == set(ALL_OPS)
    n = len(ids) * (2 + 1 + tiny.config.n_layers * len(LAYER_OPS))
    assert len(rec.tensors) == n
    assert rec.tensors[(0, 0, "q_proj")].numel() == tiny.config.hidden


def test_recorder_subset_and_off_by_default(tiny):
    ids = GGUFTokenizer(tiny).encode("abc abc")
    rec = Recorder(layers=[1], ops=["attn_norm", "logits"], positions=[0])
    m = Qwen2Model(tiny)
    m.prefill(ids, rec)
    assert set(rec.tensors) == {(0, 1, "attn_norm"), (0, -1, "logits")}


@pytest.mark.parametrize("backend", ["reference", "emulated-fp8"])
def test_streamed_weights_give_the_kept_weights_bits(tiny, backend):
    """A model too large to keep streams its weights through reused buffers (a 7B on a small machine). The forward
    fetches a group's weights (q, k, v; gate, up: alike in shape) before its GEMMs, so they must not share a buffer:
    they did, and k ran with v's weights (the 7B-shaped run-all's stages A and E on the H200 found it)."""
    from fp8parity.backends import make_backend

    ids = GGUFTokenizer(tiny).chat_ids("What is 2+2?")
    assert tiny.shape("blk.0.attn_k.weight") == tiny.shape("blk.0.attn_v.weight")  # the case that collided
    for path in ("prefill", "decode"):
        kept, streamed = Recorder(), Recorder()
        a = Qwen2Model(tiny, backend=make_backend(backend, "current"), keep_weights=True).run(ids, path, kept)
        m = Qwen2Model(tiny, backend=make_backend(backend, "current"), keep_weights=False)
        assert not m.weights.keep
        assert torch.equal(m.run(ids, path, streamed), a)
        assert kept.tensors.keys() == streamed.tensors.keys()
        assert all(torch.equal(v, streamed.tensors[k]) for k, v in kept.tensors.items())


@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("layers, ops", [([0], ["attn_norm", "q_proj"]), ([], ["embedding"]), ([0, 1], ["attention"])])
def test_a_recorder_that_keeps_nothing_past_a_layer_ends_the_forward_there(tiny, path, layers, ops):
    """What a drill-down of an early op records: the same bits as the whole forward's taps, from a forward that stops
    after the last layer kept (the ops after it are never computed, and there are no logits)."""
    ids = GGUFTokenizer(tiny).chat_ids("What is 2+2?")
    m = Qwen2Model(tiny)
    whole, early = Recorder(), Recorder(layers=layers, ops=ops)
    assert early.last_layer() == max(layers, default=-1)
    m.run(ids, path, whole)
    ran: list[int] = []
    blocks = m._block_linears
    m._block_linears = lambda x, layer, tap_in: ran.append(layer) or blocks(x, layer, tap_in)
    assert m.run(ids, path, early) is None
    assert set(ran) == set(layers)  # no GEMM of a later layer ran
    assert set(early.tensors) == {k for k in whole.tensors if k[2] in ops and (k[1] in layers or k[1] == -1)}
    assert len(early.tensors) == len(ids) * (len(ops) * max(len(layers), 1))
    for k, v in early.tensors.items():
        assert torch.equal(v, whole.tensors[k]), k
    for keeps_the_end in (Recorder(layers=[0], ops=["attn_norm", "logits"]), Recorder(ops=["attn_norm"]),
                          Recorder(layers=[0])):
        assert keeps_the_end.last_layer() is None and m.run(ids, path, keeps_the_end) is not None


def test_rope_rotates_pairs_and_keeps_norm():
    x = torch.randn(5, 2, 64, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(5), 64, 1e6, torch.float64, "cpu")
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[0], x[0])  # position 0 is the identity
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6)  # fp32 tables: ~1e-7 off unit length


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_by_roll_is_bit_identical_to_the_textbook_rotate_half(dtype):
    """The forward rotates by roll and a sign-folded sin (4 kernels, not 5): the same bits as transformers' form."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 64, generator=gen, dtype=dtype) * 50
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e30], dtype=dtype)  # signed zeros, tiny and huge values
    cos, sin = rope_tables(torch.arange(1000, 1007), 64, 1e6, dtype, "cpu")
    textbook = x * cos[:, None, :] + torch.cat((-x[..., 32:], x[..., :32]), dim=-1) * sin[:, None, :]
    y = rotate(x, cos, rotation_sin(sin))
    assert torch.equal(y, textbook) and torch.equal(torch.signbit(y), torch.signbit(textbook))
    assert torch.equal(apply_rope(x, cos, sin), textbook)


def test_q8_k_rounding_crushes_small_values_next_to_an_outlier():
    x = torch.full((1, 256), 0.3)
    x[0, 10] = -146.68  # the #3032 outlier
    y = quantize_q8_k(x)
    assert abs(float(y[0, 10]) + 146.68) < 1e-3
    assert float((y[0, 11:] == 0).float().mean()) == 1.0  # 0.3 < half a step of 146.68/127


def test_generation_stops_on_gguf_stop_tokens_and_reports_why(tiny):
    tok = GGUFTokenizer(tiny)
    stops = tok.stop_ids()
    assert tok.eos_id in stops and tok.special["<|im_end|>"] in stops
    m = Qwen2Model(tiny)
    ids = tok.chat_ids("hi")
    free = m.generate(ids, 6, None, tok)
    assert free.stop_reason == "max_new_tokens" and len(free.tokens) == 6
    first = free.tokens[2]
    forced = m.generate(ids, 6, [first], tok)  # a stop set that the run must hit at step 3
    assert forced.stop_reason == f"stop_token {first}" and forced.tokens == free.tokens[:3]


def test_options_change_the_forward(tiny):
    ids = GGUFTokenizer(tiny).encode("the quick brown fox")
    base = Qwen2Model(tiny).prefill(ids)
    for opt in (ForwardOptions(rms_eps=1e-2), ForwardOptions(rope_theta=1e4), ForwardOptions(embedding_row_offset=1),
                ForwardOptions(transposed_weights=("blk.0.attn_q.weight",))):
        assert not torch.allclose(Qwen2Model(tiny, options=opt).prefill(ids), base), opt


# --- the independent implementation: transformers' Qwen2 from the same GGUF --------------------------
@pytest.fixture(scope="module")
def hf_model(default_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_path.parent), gguf_file=default_path.name, dtype=torch.float32).eval()


# Our reference on the CPU, and on a GPU (fp32 without TF32) where there is one: both must match transformers.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU reference needs a CUDA GPU")])]


@pytest.fixture(scope="module", params=DEVICES)
def ours(default, request):
    return Qwen2Model(default, backend=ReferenceBackend(request.param)), GGUFTokenizer(default)


@pytest.mark.slow
def test_tokenizer_matches_transformers(default_path, ours):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(default_path.parent), gguf_file=default_path.name)
    tok = ours[1]
    texts = ["<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n    return x**2  # ünïcödé 日本語 🙂\n\n\n\t\t  x",
             "   multiple   spaces\r\n\r\n", "I'm can't 12345 don't", "<|endoftext|><|fim_prefix|>a<|fim_suffix|>"]
    for t in texts:
        assert tok.encode(t) == hf.encode(t, add_special_tokens=False), t
    for p in PROMPTS:
        want = hf.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert tok.chat_ids(p) == list(want), p


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_and_hidden_states_match_transformers(ours, hf_model, prompt):
    model, tok = ours
    ids = tok.chat_ids(prompt)
    rec = Recorder(ops=["post_ffn_residual", "final_norm"])
    logits = model.prefill(ids, rec).cpu()
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True)
    assert cosine(logits[-1], out.logits[0, -1]) >= 0.99999
    assert float((logits[-1] - out.logits[0, -1]).abs().max()) <= 1e-3
    hs = out.hidden_states  # [embeddings, after layer 0, ..., after layer n-2, final norm]
    n = model.cfg.n_layers
    for layer in range(n - 1):
        mine = torch.stack([rec.tensors[(p, layer, "post_ffn_residual")] for p in range(len(ids))])
        ref = hs[layer + 1][0]
        assert cosine(mine, ref) >= 0.99999, layer
        assert float((mine - ref).abs().max()) <= 1e-3, layer
    mine = torch.stack([rec.tensors[(p, -1, "final_norm")] for p in range(len(ids))])
    assert float((mine - hs[n][0]).abs().max()) <= 1e-3


@pytest.mark.slow
def test_greedy_32_tokens_match_transformers(ours, hf_model):
    model, tok = ours
    for prompt in PROMPTS[1:]:
        ids = tok.chat_ids(prompt)
        mine = model.generate(ids, 32, None, tok).tokens
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                    min_new_tokens=32)[0, len(ids):].tolist()
        assert mine == ref, prompt


@pytest.mark.slow
def test_what_is_2_plus_2(ours):
    model, tok = ours
    r = model.generate(tok.chat_ids("What is 2+2?"), 32, tok.stop_ids(), tok)
    assert tok.decode(r.tokens, skip_special=True) == "2 + 2 equals 4."
    assert r.stop_reason == f"stop_token {tok.special['<|im_end|>']}"


def test_taps_staged_on_a_device_read_back_as_recorded_ones():
    """Recorder.stage (a GPU forward's taps, copied to the host in one transfer when read) keeps what record keeps:
    the same keys, rows and position filter; exercised here with CPU tensors, the same code path but the device."""
    g = torch.Generator().manual_seed(4)
    a, b, logits = torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g), torch.randn(1, 6, generator=g)
    direct, staged = Recorder(positions=[0, 2, 9]), Recorder(positions=[0, 2, 9])
    for rec in (direct,):
        rec.record("attn_norm", 0, a, [0, 1, 2])
        rec.record("k_proj", 0, b, [0, 1, 2])
        rec.record("logits", -1, logits, [2])
    staged.stage(torch.cat([a.reshape(-1), b.reshape(-1)]), [("attn_norm", 0, 3, 4, [0, 1, 2]),
                                                            ("k_proj", 0, 3, 2, [0, 1, 2])])
    staged.stage(logits.reshape(-1).clone(), [("logits", -1, 1, 6, [2])])
    assert set(direct.tensors) == set(staged.tensors) == {(0, 0, "attn_norm"), (2, 0, "attn_norm"), (0, 0, "k_proj"),
                                                          (2, 0, "k_proj"), (2, -1, "logits")}
    assert all(torch.equal(direct.tensors[k], staged.tensors[k]) for k in direct.tensors)
