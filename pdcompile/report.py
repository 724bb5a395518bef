"""What optimize() did, per phase: passes, matches, node counts, FLOPs and bytes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .cost import REPORT_SHAPE
from .passes import PassRecord


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


@dataclass
class OptimizeReport:
    backend: str
    phases: dict[str, list[PassRecord]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    shape: dict = field(default_factory=lambda: dict(REPORT_SHAPE))

    def phase_cost(self, phase: str, when: str = "after") -> dict:
        """Estimated cost of the phase graph before the first pass or after the last one."""
        recs = [r for r in self.phases.get(phase, []) if r.cost_before]
        if not recs:
            return {}
        return recs[0].cost_before if when == "before" else recs[-1].cost_after

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizeReport":
        phases = {p: [PassRecord(**r) for r in recs] for p, recs in d.get("phases", {}).items()}
        return cls(backend=d.get("backend", ""), phases=phases, timings=d.get("timings_s", {}),
                   shape=d.get("shape", dict(REPORT_SHAPE)))

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "shape": self.shape,
            "timings_s": self.timings,
            "phases": {p: [dataclasses.asdict(r) for r in recs] for p, recs in self.phases.items()},
        }

    def rows(self):
        for phase, recs in self.phases.items():
            for r in recs:
                fb, fa = r.cost_before.get("flops"), r.cost_after.get("flops")
                bb, ba = r.cost_before.get("bytes"), r.cost_after.get("bytes")
                yield {
                    "phase": phase,
                    "pass": r.name,
                    "status": r.status,
                    "matches": r.matches,
                    "nodes": f"{r.nodes_before} -> {r.nodes_after}" if r.status != "disabled" else "-",
                    "flops": f"{_si(fb, 'FLOP')} -> {_si(fa, 'FLOP')}" if fb is not None else "-",
                    "bytes": f"{_si(bb, 'B')} -> {_si(ba, 'B')}" if bb is not None else "-",
                    "seconds": f"{r.seconds:.2f}",
                    "detail": r.detail,
                }

    def summary(self) -> list[str]:
        lines = []
        for phase in self.phases:
            before, after = self.phase_cost(phase, "before"), self.phase_cost(phase, "after")
            if before and after and before["flops"]:
                saved = 1 - after["flops"] / before["flops"]
                lines.append(
                    f"{phase}: {_si(before['flops'], 'FLOP')} -> {_si(after['flops'], 'FLOP')} "
                    f"({saved:.1%} fewer), {_si(before['bytes'], 'B')} -> {_si(after['bytes'], 'B')}"
                )
        return lines

    def __str__(self) -> str:
        cols = ("phase", "pass", "status", "matches", "nodes", "flops", "bytes", "seconds", "detail")
        rows = list(self.rows())
        widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols[:-1]}
        out = [f"pdcompile report (backend {self.backend}; cost at batch {self.shape['batch']}, "
               f"prompt {self.shape['prompt']}, cache {self.shape['capacity']})"]
        out.append("  ".join(c.ljust(widths.get(c, 0)) for c in cols))
        for r in rows:
            out.append("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in cols))
        out.extend(self.summary())
        return "\n".join(out)
