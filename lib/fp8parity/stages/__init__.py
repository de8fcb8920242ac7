"""The six stages of the falsifier cascade. Each stage is a `measure_x` (returns a typed result), a rule (a small
frozen dataclass) and a `judge_x(result, rule)` (returns a Verdict); the notebooks show all three as cells, and
the fault bench and the tests call the same functions.

Pass rules follow the spec (../shared/INVESTIGATION.md) and say so where this workbook adds to them.
"""

from fp8parity.stages.a_reproducer import ReproducerResult, ReproducerRule, ReproducerVerdict, judge_a, measure_a
from fp8parity.stages.b_parity import ParityResult, ParityRule, ParityVerdict, candidate_twin, judge_b, measure_b, record
from fp8parity.stages.b_trace import TraceParityResult, judge_b_trace, measure_b_trace
from fp8parity.stages.c_embedding import EmbeddingResult, EmbeddingRule, judge_c, measure_c
from fp8parity.stages.d_rmsnorm import RMSNormResult, RMSNormRule, judge_d, measure_d
from fp8parity.stages.e_matmul import MatmulResult, MatmulRule, control_granularity, gemm_parity, judge_e, measure_e
from fp8parity.stages.f_golden import GoldenResult, GoldenRule, judge_f, measure_f
from fp8parity.stages.oracle import REFERENCE_BAR, measure_oracle
from fp8parity.stages.verdict import FAIL, MARK_COLORS, PASS, STAGES, UNMEASURED, Verdict, save_verdict, verdict_mark

__all__ = [
    "EmbeddingResult", "EmbeddingRule", "FAIL", "GoldenResult", "GoldenRule", "MARK_COLORS", "MatmulResult",
    "MatmulRule", "PASS", "ParityResult", "ParityRule", "ParityVerdict", "REFERENCE_BAR", "RMSNormResult",
    "RMSNormRule", "ReproducerResult", "ReproducerRule", "ReproducerVerdict", "STAGES", "TraceParityResult",
    "UNMEASURED", "Verdict", "candidate_twin", "control_granularity", "gemm_parity", "judge_a", "judge_b",
    "judge_b_trace", "judge_c", "judge_d", "judge_e", "judge_f", "measure_a", "measure_b", "measure_b_trace",
    "measure_c", "measure_d", "measure_e", "measure_f", "measure_oracle", "record", "save_verdict", "verdict_mark",
]
