"""The claims check: does this run bear out the paper's claims, with the numbers?

(a) the proposed link switch (registration and switch in one REGISTER) needs fewer signalling
    messages and less handover time than register-then-switch, for each trigger;
(b) key reuse makes the terminal switch faster than renegotiating first;
(c) make-before-break (planned link switch, proposed method) loses no media.

A comparison looks at both the medians and the trials paired by number (trial k of one method
against trial k of the other: they ran back to back, on the same machine state). It *holds*
when the median favours the claim and so do most pairs, *does not hold* when both go against
it, and is *inconclusive* otherwise — or, for times, with fewer than `MIN_TIME_PAIRS` pairs:
machines are noisy and one trial says little. Message counts are a property of the procedure,
so one pair is enough for them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

LINK_SCENARIOS = ("link-planned", "link-carrier-loss", "link-blackhole")
MIN_TIME_PAIRS = 3
VOICE_INTERVAL_MS = 20  # a voice RTP packet every 20 ms: a gap near it is no gap at all

Result = dict[str, Any]


def _values(results: Sequence[Result], scenario: str, method: str, key: str
            ) -> dict[int, float]:
    """Trial number -> value, over the ok trials that have it."""
    out: dict[int, float] = {}
    for i, r in enumerate(r for r in results
                          if r["scenario"] == scenario and r["method"] == method):
        if r.get("ok") and r.get(key) is not None:
            out[int(r.get("trial", i + 1))] = float(r[key])
    return out


def compare(results: Sequence[Result], scenario: str, better: str, worse: str, key: str,
            what: str, unit: str, min_pairs: int = 1) -> dict[str, Any]:
    """Is `key` lower for `better` than for `worse` in this scenario?"""
    a, b = (_values(results, scenario, m, key) for m in (better, worse))
    out: dict[str, Any] = {"metric": key, "what": what, "unit": unit, "better": better,
                           "worse": worse}
    if not a or not b:
        missing = [m for m, v in ((better, a), (worse, b)) if not v]
        return {**out, "verdict": "not measured", "why": f"no ok trials of {' or '.join(missing)}"}
    pairs = sorted(set(a) & set(b))
    wins = sum(1 for t in pairs if a[t] < b[t])
    med_a, med_b = statistics.median(a.values()), statistics.median(b.values())
    out.update(medians=[med_a, med_b], pairs=len(pairs), wins=wins)
    if len(pairs) < min_pairs:
        verdict, why = "inconclusive", f"{len(pairs)} trial pair(s); {min_pairs} needed"
    elif med_a < med_b and wins * 2 > len(pairs):
        verdict, why = "holds", ""
    elif med_a >= med_b and wins * 2 < len(pairs):
        verdict, why = "does not hold", ""
    else:
        verdict, why = "inconclusive", "the medians and the trial pairs disagree"
    return {**out, "verdict": verdict, "why": why}


def _combine(verdicts: Sequence[str]) -> str:
    """All must hold; one failure fails; unmeasured parts do not count, unless none is."""
    measured = [v for v in verdicts if v != "not measured"]
    if not measured:
        return "not measured"
    for v in ("does not hold", "inconclusive"):
        if v in measured:
            return v
    return "holds"


def _claim_a(results: Sequence[Result]) -> dict[str, Any]:
    parts = []
    for scn in LINK_SCENARIOS:
        checks = [compare(results, scn, "proposed", "register-then-switch", "messages",
                          "messages", "", 1),
                  compare(results, scn, "proposed", "register-then-switch", "handover_ms",
                          "handover", "ms", MIN_TIME_PAIRS)]
        parts.append({"scenario": scn, "verdict": _combine([c["verdict"] for c in checks]),
                      "checks": checks})
    measured = sum(1 for p in parts if p["verdict"] != "not measured")
    return {"claim": "the proposed link switch uses fewer signalling messages and less "
                     "handover time than register-then-switch, for each trigger",
            "verdict": _combine([p["verdict"] for p in parts]), "parts": parts,
            "scope": f"{measured} of {len(parts)} triggers measured"}


def _claim_b(results: Sequence[Result]) -> dict[str, Any]:
    check = compare(results, "terminal-switch", "reuse", "renegotiate", "handover_ms",
                    "handover", "ms", MIN_TIME_PAIRS)
    context = compare(results, "terminal-switch", "reuse", "renegotiate", "gap_ms",
                      "largest media gap", "ms")
    return {"claim": "key reuse makes the terminal switch faster than renegotiating first",
            "verdict": check["verdict"], "checks": [check], "context": [context]}


def _claim_c(results: Sequence[Result]) -> dict[str, Any]:
    lost = _values(results, "link-planned", "proposed", "lost")
    gaps = _values(results, "link-planned", "proposed", "gap_ms")
    out: dict[str, Any] = {"claim": "make-before-break (planned link switch, proposed method) "
                                    "loses no media", "trials": len(lost),
                           "lossless": sum(1 for v in lost.values() if v == 0),
                           "lost_max": max(lost.values()) if lost else None,
                           "gap_median_ms": statistics.median(gaps.values()) if gaps else None,
                           "voice_interval_ms": VOICE_INTERVAL_MS}
    if not lost:
        return {**out, "verdict": "not measured", "why": "no ok trials of link-planned/proposed"}
    return {**out, "verdict": "holds" if out["lossless"] == len(lost) else "does not hold"}


def claims(results: Sequence[Result]) -> dict[str, dict[str, Any]]:
    """The verdicts, from the per-trial results (ok or not) of a run."""
    return {"a": _claim_a(results), "b": _claim_b(results), "c": _claim_c(results)}


# -- results.md ------------------------------------------------------------------------------
def _num(v: float, unit: str) -> str:
    text = f"{v:.0f}" if float(v).is_integer() or abs(v) >= 100 else f"{v:.1f}"
    return f"{text} {unit}".strip()


def _check_text(c: dict[str, Any]) -> str:
    if c["verdict"] == "not measured":
        return f"{c['what']}: not measured ({c['why']})"
    (a, b), unit = c["medians"], c["unit"]
    text = (f"{c['what']} {_num(a, unit)} vs {_num(b, unit)} (medians); lower in "
            f"{c['wins']} of {c['pairs']} trial pairs")
    return text + (f" — {c['why']}" if c.get("why") else "")


def markdown(claim_set: dict[str, dict[str, Any]]) -> list[str]:
    """The claims section of results.md, as lines."""
    lines = ["## Claims", "",
             f"Verdicts: *holds* when the median and most trial pairs agree with the claim, "
             f"*inconclusive* when they disagree or there are fewer than {MIN_TIME_PAIRS} "
             f"pairs for a time, *not measured* when a method has no ok trial.", ""]
    a, b, c = claim_set["a"], claim_set["b"], claim_set["c"]
    lines.append(f"* **(a) {a['verdict']}** — {a['claim']} ({a['scope']}).")
    for part in a["parts"]:
        if part["verdict"] == "not measured":
            lines.append(f"  * {part['scenario']}: not measured")
            continue
        lines.append(f"  * {part['scenario']}: {part['verdict']} — "
                     + "; ".join(_check_text(ch) for ch in part["checks"]))
    lines.append(f"* **(b) {b['verdict']}** — {b['claim']}: {_check_text(b['checks'][0])}.")
    ctx = b["context"][0]
    if ctx["verdict"] != "not measured":
        lines.append(f"  * for context, not part of the claim: {_check_text(ctx)}")
    if c["verdict"] == "not measured":
        lines.append(f"* **(c) not measured** — {c['claim']} ({c['why']}).")
    else:
        gap = c["gap_median_ms"]
        gap_text = (f"; largest media gap {_num(gap, 'ms')} (median; a voice packet every "
                    f"{c['voice_interval_ms']} ms)" if gap is not None else "")
        lines.append(f"* **(c) {c['verdict']}** — {c['claim']}: no packet lost in "
                     f"{c['lossless']} of {c['trials']} trials (most lost in one: "
                     f"{c['lost_max']:.0f}){gap_text}.")
    return lines
