"""Distribution parity over a corpus: KL divergence, top-token agreement, Δp and perplexity, candidate against
reference, as llama.cpp's `llama-perplexity --kl-divergence` reports them.

The corpus is cut into windows of `n_ctx` tokens; each window is one prefill on both sides, and only its second
half is scored (every scored token has at least n_ctx/2 tokens of context), as llama.cpp does. Statistics are
accumulated window by window: logits are never held for the whole corpus (4,096 positions × 152k vocabulary would
be 2.5 GB in fp32), only a few numbers per scored position.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fp8parity.config import RunConfig, validate
from fp8parity.errors import WorkbookError
from fp8parity.workbench import calibrate

# Real text and code on every machine, offline: the Python standard library's own sources and docstrings.
CORPUS_MODULES = ("textwrap", "fractions", "heapq", "bisect", "shlex", "colorsys", "string", "calendar")
PERCENTILES = (100, 99.9, 99, 95, 90, 50, 10, 5, 1, 0.1, 0)
N_CTX = 512
SCORE_CHUNK = 32  # rows scored at once: 32 x 152k vocabulary in float64 is 39 MB per temporary


def stdlib_corpus() -> tuple[str, str]:
    """(text, description): the sources of CORPUS_MODULES as this Python ships them (the hash tells versions apart)."""
    parts, names = [], []
    for name in CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        parts.append(Path(spec.origin).read_text(encoding="utf-8"))
        names.append(name)
    return "\n\n".join(parts), "Python standard library sources: " + ", ".join(f"{n}.py" for n in names)


def load_corpus(path: str | None) -> tuple[str, str]:
    if not path:
        return stdlib_corpus()
    p = Path(path)
    if not p.is_file():
        raise WorkbookError(f"CORPUS={path!r} is not a file; give a UTF-8 text file, or leave CORPUS empty.")
    try:
        return p.read_text(encoding="utf-8"), f"user corpus {p.name}"
    except UnicodeDecodeError:
        raise WorkbookError(f"CORPUS={path!r} is not UTF-8 text.") from None


def corpus_ids(tok, text: str, n_tokens: int, n_ctx: int = N_CTX) -> list[int]:
    ids = tok.encode(text)
    if len(ids) < n_ctx:
        raise WorkbookError(f"the corpus holds {len(ids)} tokens, fewer than one window of {n_ctx}; give more text.")
    whole = (min(n_tokens, len(ids)) // n_ctx) * n_ctx  # whole windows only
    return ids[:whole]


def sha256_ids(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


@dataclass
class PositionStats:
    """Per scored position, the only things kept: a few floats each."""

    position: list[int] = field(default_factory=list)
    kld: list[float] = field(default_factory=list)  # KL(reference || candidate), nats
    same_top: list[bool] = field(default_factory=list)
    delta_p: list[float] = field(default_factory=list)  # p_cand(ref top) - p_ref(ref top)
    p_ref_top: list[float] = field(default_factory=list)
    nll_ref: list[float] = field(default_factory=list)  # -ln p_ref(next token)
    nll_cand: list[float] = field(default_factory=list)
    ref_top: list[int] = field(default_factory=list)
    cand_top: list[int] = field(default_factory=list)

    def extend(self, positions, ref_logits: torch.Tensor, cand_logits: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Score rows of logits (T, vocab): in float64, so that a KLD of 1e-9 is not rounding noise."""
        # the same numbers as log_softmax(x.double()) and exp(lr) * (lr - lc), in fewer passes over 152k columns
        lr = torch.log_softmax(ref_logits, -1, dtype=torch.float64)
        lc = torch.log_softmax(cand_logits, -1, dtype=torch.float64)
        kld = F.kl_div(lc, lr, reduction="none", log_target=True).sum(-1).clamp_min(0)  # tiny negatives are rounding
        top_r, top_c = lr.argmax(-1), lc.argmax(-1)
        pr_top = lr.gather(-1, top_r[:, None]).exp()[:, 0]
        pc_top = lc.gather(-1, top_r[:, None]).exp()[:, 0]
        self.position += list(positions)
        self.kld += kld.tolist()
        self.same_top += (top_r == top_c).tolist()
        self.delta_p += (pc_top - pr_top).tolist()
        self.p_ref_top += pr_top.tolist()
        self.nll_ref += (-lr.gather(-1, next_ids[:, None])[:, 0]).tolist()
        self.nll_cand += (-lc.gather(-1, next_ids[:, None])[:, 0]).tolist()
        self.ref_top += top_r.tolist()
        self.cand_top += top_c.tolist()


def scored_windows(ids: list[int], n_ctx: int = N_CTX):
    """(window token ids, the scored positions within the window, their absolute positions in the corpus)."""
    for start in range(0, len(ids) - n_ctx + 1, n_ctx):
        window = ids[start:start + n_ctx]
        first = n_ctx // 2
        yield window, list(range(first, n_ctx - 1)), [start + i for i in range(first, n_ctx - 1)]


def measure(reference, candidate, ids: list[int], n_ctx: int = N_CTX, desc: str = "windows",
            reference_logits: dict[int, torch.Tensor] | None = None, keep: int = 0) -> PositionStats:
    """Both models over every window; statistics of the scored half, window by window. The reference's logits of a
    window found in `reference_logits` (by its first position) are not computed again; those of the first `keep`
    windows are left there for the next call (the fp64 floor scores the first window against the same reference)."""
    out, reference_logits = PositionStats(), {} if reference_logits is None else reference_logits
    for k, (window, rel, absolute) in enumerate(tqdm(list(scored_windows(ids, n_ctx)), desc=desc)):
        rows = slice(rel[0], rel[-1] + 1)  # logits of the scored half only: half the lm_head, half the memory
        start = absolute[0] - rel[0]
        ref = reference_logits.pop(start, None)
        ref = reference.prefill(window, logits_for=rows).cpu() if ref is None else ref
        if k < keep:
            reference_logits[start] = ref
        cand = candidate.prefill(window, logits_for=rows).cpu()
        nxt = torch.tensor([window[i + 1] for i in rel])
        for c in range(0, len(rel), SCORE_CHUNK):  # float64 log-softmax a few rows at a time: bounded memory
            part = slice(c, c + SCORE_CHUNK)
            out.extend(absolute[part], ref[part], cand[part], nxt[part])
        del ref, cand
    return out


def _pct(values: np.ndarray) -> dict[str, float]:
    return {f"p{p:g}": float(np.percentile(values, p)) for p in PERCENTILES}


def summarize(s: PositionStats) -> dict:
    """Every statistic llama-perplexity --kl-divergence prints, with uncertainties where it gives them."""
    kld, dp = np.asarray(s.kld), np.asarray(s.delta_p)
    same = np.asarray(s.same_top, dtype=float)
    nr, nc = np.asarray(s.nll_ref), np.asarray(s.nll_cand)
    n = len(kld)
    ppl_ref, ppl_cand = math.exp(nr.mean()), math.exp(nc.mean())
    # uncertainty of ln(PPL(cand)/PPL(ref)) from the per-position differences, as llama.cpp propagates it
    d = nc - nr
    ln_ratio_err = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "positions": n, "mean_kld": float(kld.mean()),
        "mean_kld_err": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "kld_percentiles": _pct(kld), "same_top_p": float(same.mean()),
        "same_top_p_err": float(math.sqrt(same.mean() * (1 - same.mean()) / n)) if n else math.nan,
        "delta_p_mean": float(dp.mean()), "delta_p_rms": float(math.sqrt((dp ** 2).mean())),
        "delta_p_percentiles": _pct(dp), "ppl_reference": ppl_ref, "ppl_candidate": ppl_cand,
        "ppl_ratio": ppl_cand / ppl_ref, "ppl_ratio_err": float(ppl_cand / ppl_ref * ln_ratio_err),
        "ln_ppl_correlation": float(np.corrcoef(nr, nc)[0, 1]) if n > 1 and nr.std() > 0 and nc.std() > 0 else 1.0,
    }


def first_greedy_difference(s: PositionStats) -> int | None:
    """The first scored position where the candidate's greedy choice differs from the reference's, or None."""
    for pos, same in zip(s.position, s.same_top, strict=True):
        if not same:
            return pos
    return None


@dataclass
class DistributionResult:
    corpus: str  # what the text is
    tokens: int
    tokens_sha256: str
    n_ctx: int
    candidate: dict  # summarize() of the candidate against the reference
    oracle: dict  # summarize() of the fp64 oracle against the reference (the floor), over `oracle_windows`
    oracle_windows: int
    first_greedy_difference: int | None
    stats: PositionStats

    def table(self):
        import pandas as pd

        rows = {}
        for name, s in (("candidate vs reference", self.candidate), ("fp64 oracle vs reference (floor)", self.oracle)):
            if not s:
                continue
            rows[name] = {"positions": s["positions"], "mean KLD": s["mean_kld"], "± KLD": s["mean_kld_err"],
                          "max KLD": s["kld_percentiles"]["p100"], "99.9% KLD": s["kld_percentiles"]["p99.9"],
                          "median KLD": s["kld_percentiles"]["p50"], "same top p": s["same_top_p"],
                          "± same top": s["same_top_p_err"], "RMS Δp": s["delta_p_rms"],
                          "PPL ratio": s["ppl_ratio"], "cor ln PPL": s["ln_ppl_correlation"]}
        return pd.DataFrame(rows).T

    def to_dict(self) -> dict:
        return {"corpus": self.corpus, "tokens": self.tokens, "tokens_sha256": self.tokens_sha256, "n_ctx": self.n_ctx,
                "candidate": self.candidate, "oracle": self.oracle, "oracle_windows": self.oracle_windows,
                "first_greedy_difference": self.first_greedy_difference}


def distribution_parity(reference, candidate, oracle, tok, corpus: str = "",
                        n_tokens: int = RunConfig.corpus_tokens,
                        n_ctx: int = N_CTX, oracle_windows: int = 1) -> DistributionResult:
    """Candidate vs reference over the corpus; the fp64 oracle vs reference over the first windows as the floor
    (fp64 is several times slower than the whole candidate pass on a CPU: the floor needs only its size)."""
    text, what = load_corpus(corpus)
    ids = corpus_ids(tok, text, n_tokens, n_ctx)
    calibrate(candidate, ids[:n_ctx])  # delayed-calibrated: scales from the first window's amax; others: nothing
    kept: dict[int, torch.Tensor] = {}  # the reference's logits of the floor's windows, computed once
    stats = measure(reference, candidate, ids, n_ctx, "candidate windows", kept, keep=oracle_windows)
    floor = measure(reference, oracle, ids[: n_ctx * oracle_windows], n_ctx, "fp64 oracle windows", kept)
    return DistributionResult(what, len(ids), sha256_ids(ids), n_ctx, summarize(stats),
                              summarize(floor) if oracle_windows else {},
                              oracle_windows, first_greedy_difference(stats), stats)


def context_text(tok, ids: list[int], position: int, before: int = 24, after: int = 4) -> str:
    """The corpus around a position, the scored token marked [[like this]]."""
    left = tok.decode(ids[max(0, position + 1 - before): position + 1])
    tgt = tok.decode(ids[position + 1: position + 2])
    right = tok.decode(ids[position + 2: position + 2 + after])
    return f"{left}[[{tgt}]]{right}".replace("\n", "⏎")


CPU_CANDIDATES = ("emulated-fp8:current", "emulated-fp8:delayed-calibrated", "emulated-fp8:rowwise", "emulated-fp8:block")
GPU_CANDIDATES = ("bf16", "te:current", "te:delayed-calibrated", "te:block", "torch-fp8:current", "torch-fp8:rowwise",
                  "emulated-fp8:current")


def compare_backends(model: str, candidates: list[str], runs_dir: str = "runs", corpus: str = "",
                     corpus_tokens: int = RunConfig.corpus_tokens) -> Path:
    """`make distribution`: notebook 09 once per candidate, into one folder, then one comparison table and figure."""
    import json
    from datetime import datetime

    import pandas as pd

    from fp8parity.plots import DPI, bars
    from fp8parity.runner import run_all

    configs = []
    for c in candidates:  # every candidate checked before anything runs
        backend, _, recipe = c.partition(":")
        cfg = RunConfig(model=model, backend=backend, recipe=recipe or RunConfig.recipe, corpus=corpus,
                        corpus_tokens=corpus_tokens, run_id=c.replace(":", "-"))
        validate(cfg)
        configs.append((c, cfg))
    out = Path(runs_dir) / f"distribution-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True)
    rows = []
    for name, cfg in configs:
        run_all(cfg, runs_dir=str(out), notebooks="09")
        d = json.loads((out / cfg.run_id / "distribution.json").read_text())
        c = d["candidate"]
        rows.append({"candidate": name, "mean_kld": c["mean_kld"], "mean_kld_err": c["mean_kld_err"],
                     "kld_p99": c["kld_percentiles"]["p99"], "kld_max": c["kld_percentiles"]["p100"],
                     "same_top_p": c["same_top_p"], "delta_p_rms": c["delta_p_rms"], "ppl_ratio": c["ppl_ratio"],
                     "oracle_mean_kld": (d["oracle"] or {}).get("mean_kld"), "tokens": d["tokens"],
                     "first_greedy_difference": d["first_greedy_difference"]})
    df = pd.DataFrame(rows)
    df.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(df.to_markdown(index=False, floatfmt=".4g") + "\n")
    bars(df, "candidate", ["mean_kld"], "mean KLD against the reference over the corpus", "nats", log=True
         ).savefig(out / "comparison.png", dpi=DPI)
    print(df.to_markdown(index=False, floatfmt=".4g"))
    print(f"comparison: {out / 'comparison.md'}")
    return out
