"""What every stage returns: a Verdict (pass / fail / unmeasured, one sentence, and the typed numbers behind it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fp8parity.workbench import Workbench

PASS, FAIL, UNMEASURED = "pass", "fail", "unmeasured"
STAGES = {"A": "deterministic reproducer", "B": "per-layer parity", "C": "embedding lookup parity",
          "D": "pre-attention RMSNorm parity", "E": "Q/K/V FP8 matmul parity", "F": "golden output"}
MARK_COLORS = {PASS: "#1a7f37", FAIL: "#cf222e", UNMEASURED: "#6e7781"}


def verdict_mark(status: str) -> str:
    """The verdict as coloured text: no emoji, which render as empty boxes where the font lacks them."""
    return f'<span style="color:{MARK_COLORS[status]};font-weight:bold">{status.upper()}</span>'


@dataclass
class Verdict:
    """A stage's verdict; each stage's subclass adds the typed numbers its judgment rests on."""

    stage: str
    status: str  # pass / fail / unmeasured
    summary: str  # one sentence a reviewer reads first

    @property
    def title(self) -> str:
        return f"Stage {self.stage}: {STAGES[self.stage]}"

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def numbers(self) -> dict:
        """The subclass's fields: what the verdict JSON carries under 'numbers'."""
        base = {f.name for f in fields(Verdict)}
        return {k: v for k, v in asdict(self).items() if k not in base}

    def to_dict(self) -> dict:
        return {"stage": self.stage, "status": self.status, "summary": self.summary, "title": self.title,
                "numbers": self.numbers()}

    def markdown(self) -> str:
        return f"### {self.title} — {verdict_mark(self.status)}\n\n{self.summary}"


def save_verdict(wb: Workbench, v: Verdict) -> None:
    wb.save_json(f"verdicts/stage_{v.stage}.json", v.to_dict() | {"provenance": wb.provenance()})
