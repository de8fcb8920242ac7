"""The fault catalogue: bug classes from the investigation, each injectable into one side of the comparison.

Each fault names its bug class (with its reference in ../shared/INVESTIGATION.md), the stage where the
cascade should first see it (and the layer and op where it has one), and how it is injected. Faults
change only the candidate side, except `reference-q8k-activations`, which corrupts the reference so
that the cascade must name the reference as the outlier when both are judged against fp64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fp8parity.errors import WorkbookError
from fp8parity.qwen2 import ForwardOptions


@dataclass(frozen=True)
class Fault:
    name: str
    bug_class: str
    reference: str  # where the investigation met it
    expected_stage: str  # "A".."F", or "none" for an honest drift that must not raise an alarm
    expected_layer: int | None = None  # stage B's first divergent layer (-1: embedding / final), if any
    expected_op: str | None = None  # stage B's first divergent op, if any
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
    Fault("per-batch-scale-ftz", "one per-batch E4M3 scale with subnormals flushed to zero", "#3807",
          expected_stage="E", expected_layer=0, expected_op="q_proj", backend_options={"granularity": "batch-ftz"},
          backends=("emulated-fp8",), fp8=True),
    Fault("fp16-gemm-output", "FP8 GEMM output stored as fp16 (overflow above 65504)", "#3728",
          expected_stage="E", backend_options={"output_dtype": "fp16"}, backends=("emulated-fp8",), fp8=True),
    Fault("stale-activation-cache", "quantized activations cached by (pointer, count) reused across GEMMs", "#3727",
          expected_stage="B", expected_layer=0, expected_op="attn_out",
          backend_options={"stale_activation_cache": True}, backends=("emulated-fp8",), fp8=True),
    Fault("transposed-q-weight", "a GEMV read the weights transposed", "#1651", expected_stage="E",
          expected_layer=0, expected_op="q_proj", options={"transposed_weights": ("blk.0.attn_q.weight",)}),
    Fault("embedding-off-by-one", "embedding row id+1 read for each token", "spec stage C", expected_stage="C",
          expected_layer=-1, expected_op="embedding", options={"embedding_row_offset": 1}),
    Fault("rope-theta-1e4", "RoPE theta 10000 instead of the file's 1e6", "spec stage B (RoPE)", expected_stage="B",
          expected_layer=0, expected_op="q_post_rope", options={"rope_theta": 1e4}),
    Fault("reference-q8k-activations", "the reference quantizes activations like Q8_K (one scale per 256)",
          "#3032 / #2971", expected_stage="B", side="reference", options={"activation_quant": "q8_k"}),
    Fault("bias-bf16", "Q/K/V bias rounded to bf16 (TE does this): a small honest drift", "FP8-NOTES",
          expected_stage="none", backend_options={"bias_dtype": "bf16"}, backends=("emulated-fp8",), fp8=True),
)
FAULTS = {f.name: f for f in CATALOGUE}


def get_fault(name: str | None) -> Fault:
    key = name or "none"
    if key not in FAULTS:
        raise WorkbookError(f"unknown fault {key!r}; known: {', '.join(FAULTS)}.")
    return FAULTS[key]
