"""Stage B with llama.cpp as the candidate, and the stages an engine cannot take. Stages A, C and F need only what
any candidate model answers (logits, embedding rows, generation), which LlamaCppEngine does: they run unchanged
(`Workbench.use_engine`). Stage B reads llama.cpp's taps into traces and replays them against llama.cpp's own twin.
Stages D and E need the candidate's RMSNorm and GEMMs fed the reference's own inputs, which an engine does not offer:
they are UNMEASURED (its attn_norm and q/k/v are replayed by stage B's local check)."""

from __future__ import annotations

from fp8parity.engines.llamacpp import LlamaCppEngine
from fp8parity.stages import ParityRule, TraceParityResult, judge_b_trace, measure_b_trace
from fp8parity.stages.verdict import FAIL, UNMEASURED, Verdict
from fp8parity.trace import save_trace
from fp8parity.workbench import Workbench

ENGINE_CANNOT = {"D": "llama.cpp's RMSNorm cannot be fed the reference's own inputs; its attn_norm of every layer is "
                      "replayed by stage B's local check instead.",
                 "E": "llama.cpp's GEMMs cannot be fed chosen operands; its q/k/v of every layer are replayed by "
                      "stage B's local check (against llama.cpp's own Q8 twin) instead."}
def measure_b(engine: LlamaCppEngine, wb: Workbench, paths) -> list[TraceParityResult]:
    """Each prompt on each path traced through the engine into the run folder, then replayed by llama.cpp's twin."""
    out = []
    for i in range(len(wb.prompts)):
        ids = wb.prompt_ids(i)
        for path in paths:
            engine.run(ids, path)
            folder = wb.run_dir / "traces" / f"prompt{i}-{path}" / "candidate"
            meta = {"path": path, "prompt_ids": ids, "prompt": wb.prompts[i], "side": "candidate",
                    "twin": {"arithmetic": engine.twin_arithmetic}}
            save_trace(folder, engine.taps, meta | wb.provenance())
            out.append(measure_b_trace(wb, folder))
    return out


def judge_b(results: list[TraceParityResult], rule: ParityRule) -> Verdict:
    """The first trace whose replay fails, or a pass over all of them."""
    verdicts = [judge_b_trace(r, rule) for r in results]
    failed = [v for v in verdicts if v.status == FAIL]
    if failed:
        return failed[0]
    v = verdicts[-1]
    v.summary = f"{len(verdicts)} traces (prompts × paths) replayed: " + " ".join(x.summary for x in verdicts)
    return v


def unmeasured(stage: str) -> Verdict:
    return Verdict(stage, UNMEASURED, ENGINE_CANNOT[stage])
