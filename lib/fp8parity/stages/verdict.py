"""What every stage returns: a Verdict (pass / fail / unmeasured, one sentence, and the typed numbers behind it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fp8parity.stage_names import FAIL, MARK_COLORS, PASS, STAGES, UNMEASURED, verdict_mark
from fp8parity.workbench import Workbench

__all__ = ["FAIL", "MARK_COLORS", "PASS", "STAGES", "UNMEASURED", "Verdict", "save_verdict", "verdict_mark"]


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
