"""The fault catalogue: bug classes from the investigation, each injectable into one side of the comparison.

Each fault names its bug class (with its reference in ../shared/INVESTIGATION.md), the stage where the
cascade should first see it (and the layer and op where it has one), and how it is injected. Faults
change only the candidate side, except `reference-q8k-activations`, which corrupts the reference so
that the cascade must name the reference as the outlier when both are judged against fp64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gguf import MODEL_TENSOR

from fp8parity.errors import WorkbookError
from fp8parity.names import tensor_name
from fp8parity.qwen2 import ForwardOptions


@dataclass(frozen=True)
class Fault:
    name: str
    bug_class: str
    reference: str  # where the investigation met it
    expected_stage: str  # "A".."F", or "none" for an honest drift that must not raise an alarm
    expected_layer: int | None = None  # stage B's first divergent layer (-1: embedding / final), if any
    expected_op: str | None = None  # stage B's first divergent op, if any
    expected_path: str = "both"  # the path(s) stage B must find it on: prefill, decode or both (and only there)
    side: str = "candidate"  # which side is corrupted
    options: dict = field(default_factory=dict)  # ForwardOptions fields on that side
    backend_options: dict = field(default_factory=dict)  # emulated-fp8 options on the candidate backend
    recipe: str | None = None  # recipe forced on the candidate
    stop_tokens: bool = True  # False: generate without the GGUF's stop tokens
    fp8: bool = False  # an FP8 bug class: injected on an FP8 candidate and judged against the clean FP8 run
    backends: tuple[str, ...] = ("emulated-fp8", "te", "torch-fp8", "bf16", "reference")

    def forward_options(self) -> ForwardOptions:
        return ForwardOptions(**self.options)


CATALOGUE: tuple[Fault, ...] = (
    Fault("none", "clean run: no fault injected", "-", expected_stage="none"),
    Fault("missing-stop-tokens", "generation without stop tokens runs past <|im_end|>", "PR #1890, #3870",
          expected_stage="F", stop_tokens=False),
    Fault("rmsnorm-eps-1e-5", "RMSNorm eps 1e-5 instead of the file's 1e-6", "spec stage D (PMAT-698n)",
          expected_stage="D", expected_layer=0, expected_op="attn_norm", options={"rms_eps": 1e-5}),
    # scale 1.0 clips every GEMM input above 448: in Qwen2.5-0.5B the first is layer 2's ffn_down (input amax 565,
    # where the massive activation is made); weights of ~0.02 keep 1-2 significant bits everywhere (stage E)
    Fault("delayed-scaling-uncalibrated", "TE DelayedScaling under no_grad: scales stay 1.0", "FP8-NOTES pitfall",
          expected_stage="E", expected_layer=2, expected_op="ffn_out", recipe="delayed",
          backends=("emulated-fp8", "te"), fp8=True),
    # a per-batch scale bites where one row of the batch dwarfs the others: layer 2's ffn_down input, where the
    # massive activation (565 at position 0) sets the scale of the whole prefill batch and pushes the other rows'
    # values into E4M3's subnormal range, which is flushed. A decode step is a batch of one row: nothing to see there.
    Fault("per-batch-scale-ftz", "one per-batch E4M3 scale with subnormals flushed to zero", "#3807",
          expected_stage="B", expected_layer=2, expected_op="ffn_out", expected_path="prefill",
          backend_options={"granularity": "batch-ftz"}, backends=("emulated-fp8",), fp8=True),
    # fp16 storage only hurts above 65504; no GEMM output of Qwen2.5-Coder-0.5B comes near (#3728's 7B peaked at
    # 85,807), and rounding to fp16 (2^-11) stays under the FP8 floor: on this model it must raise no alarm
    Fault("fp16-gemm-output", "FP8 GEMM output stored as fp16 (harmless below 65504)", "#3728",
          expected_stage="none", backend_options={"output_dtype": "fp16"}, backends=("emulated-fp8",), fp8=True),
    Fault("stale-activation-cache", "quantized activations cached by (pointer, count) reused across GEMMs", "#3727",
          expected_stage="B", expected_layer=0, expected_op="attn_out",
          backend_options={"stale_activation_cache": True}, backends=("emulated-fp8",), fp8=True),
    Fault("transposed-q-weight", "a GEMV read the weights transposed", "#1651", expected_stage="E",
          expected_layer=0, expected_op="q_proj", options={"transposed_weights": (tensor_name(MODEL_TENSOR.ATTN_Q, 0),)}),
    Fault("embedding-off-by-one", "embedding row id+1 read for each token", "spec stage C", expected_stage="C",
          expected_layer=-1, expected_op="embedding", options={"embedding_row_offset": 1}),
    Fault("rope-theta-1e4", "RoPE theta 10000 instead of the file's 1e6", "spec stage B (RoPE)", expected_stage="B",
          expected_layer=0, expected_op="q_post_rope", options={"rope_theta": 1e4}),
    Fault("reference-q8k-activations", "the reference quantizes activations like Q8_K (one scale per 256)",
          "#3032 / #2971", expected_stage="B", side="reference", options={"activation_quant": "q8_k"}),
    # classes a cosine threshold misses: small, scale-only, path-bound or position-bound (issue #11)
    Fault("gemm-scale-0.96", "one GEMM's output multiplied by 0.96 (a wrong dequantization scale)", "affine 0.96·CPU",
          expected_stage="B", expected_layer=1, expected_op="ffn_up", options={"perturb": ((1, "ffn_up", "scale", -0.04,
                                                                                                   "both"),)}),
    Fault("decode-offset-3pct", "an additive offset of 3% of the output's RMS on one GEMM, decode only",
          "affine +0.12 / #1876", expected_stage="B", expected_layer=2, expected_op="v_proj", expected_path="decode",
          options={"perturb": ((2, "v_proj", "offset", 0.03, "decode"),)}),
    Fault("head-permutation", "two heads of q_proj swapped (a column/head layout bug)", "#1651 class",
          expected_stage="B", expected_layer=1, expected_op="q_proj", options={"perturb": ((1, "q_proj", "permute",
                                                                                                   0.0, "both"),)}),
    Fault("kv-cache-shift-decode", "decode attention reads the K/V cache shifted by one position", "#3729 / #1876",
          expected_stage="B", expected_layer=0, expected_op="attention", expected_path="decode",
          options={"kv_shift_decode": True}),
    Fault("attention-scale-1/d", "softmax scale 1/head_dim instead of 1/sqrt(head_dim)", "spec stage B",
          expected_stage="B", expected_layer=0, expected_op="attention", options={"attn_scale_power": 1.0}),
    Fault("rope-wrong-past-16", "RoPE theta 1e4 only from position 16 on (a wrong long-context table)", "spec stage B",
          expected_stage="B", expected_layer=0, expected_op="q_post_rope", options={"rope_wrong_from": 16}),
    Fault("softmax-fp16", "attention scores and softmax in fp16", "FP8-NOTES class", expected_stage="B",
          expected_layer=0, expected_op="attention", options={"softmax_fp16": True}),
    Fault("bias-bf16", "Q/K/V bias rounded to bf16 (TE does this): a small honest drift", "FP8-NOTES",
          expected_stage="none", backend_options={"bias_dtype": "bf16"}, backends=("emulated-fp8",), fp8=True),
)
FAULTS = {f.name: f for f in CATALOGUE}


def get_fault(name: str | None) -> Fault:
    key = name or "none"
    if key not in FAULTS:
        raise WorkbookError(f"unknown fault {key!r}; known: {', '.join(FAULTS)}.")
    return FAULTS[key]
