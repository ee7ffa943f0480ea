"""The claims check: does this run bear out the paper's claims, with the numbers?

(a) the proposed link switch (registration and switch in one REGISTER) needs fewer signalling
    messages and less handover time than register-then-switch, for each trigger;
(b) key reuse makes the terminal switch faster than renegotiating first;
(c) make-before-break (planned link switch, proposed method) loses no media.

A comparison looks at both the medians and the trials paired by number (trial k of one method
against trial k of the other: they ran in the same round, on the same machine state). For a
time it *holds* when the median favours the claim and so many pairs do that chance alone would
rarely give as many (a one-sided sign test over the pairs, p <= `SIGNIFICANCE`), *does not hold*
when both go against it just as clearly, and is *inconclusive* otherwise: when the medians
differ by no more than the noise (`TIME_TOLERANCE_MS` or `TIME_TOLERANCE` of the larger), when
medians and pairs disagree, when the pairs could be chance, or with fewer than `MIN_TIME_PAIRS`
pairs (below that not even a clean sweep could be told from chance). Why a test and not "most
pairs": a switch ends at the first RTP on the new path, and voice goes every 20 ms, so each time
carries up to 20 ms of send-phase luck; 4 of 5 pairs happens by chance 19 % of the time.
Message counts are a property of the procedure, so one pair is enough for them and any
difference counts (the median and most pairs decide). Times of the link switch are compared
after detection (*switch*: the terminal's trigger to the first RTP on the new path): detection
is the same for every method. A claim with parts holds when every measured part holds, does
not hold when one part does not, and is inconclusive otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

LINK_SCENARIOS = ("link-planned", "link-carrier-loss", "link-blackhole")
SIGNIFICANCE = 0.05
MIN_LOSS_TRIALS = 3  # "loses no media" needs a few lossless trials; one loss disproves it
TIME_TOLERANCE_MS = 1.0
TIME_TOLERANCE = 0.03
VOICE_INTERVAL_MS = 20  # a voice RTP packet every 20 ms: a gap near it is no gap at all

Result = dict[str, Any]


def sign_p(k: int, n: int) -> float:
    """The one-sided sign test: how likely at least `k` of `n` pairs favour one side by chance."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


# The fewest pairs whose clean sweep a sign test tells from chance (5 at p <= 0.05).
MIN_TIME_PAIRS = next(n for n in range(1, 64) if sign_p(n, n) <= SIGNIFICANCE)


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
            what: str, unit: str, min_pairs: int = 1, timed: bool = False) -> dict[str, Any]:
    """Is `key` lower for `better` than for `worse` in this scenario? (`timed`: a time,
    whose medians must differ by more than the noise.)"""
    a, b = (_values(results, scenario, m, key) for m in (better, worse))
    out: dict[str, Any] = {"metric": key, "what": what, "unit": unit, "better": better,
                           "worse": worse}
    if not a or not b:
        missing = [m for m, v in ((better, a), (worse, b)) if not v]
        return {**out, "verdict": "not measured", "why": f"no ok trials of {' or '.join(missing)}"}
    pairs = sorted(set(a) & set(b))
    wins = sum(1 for t in pairs if a[t] < b[t])
    losses = sum(1 for t in pairs if a[t] > b[t])
    med_a, med_b = statistics.median(a.values()), statistics.median(b.values())
    out.update(medians=[med_a, med_b], pairs=len(pairs), wins=wins)
    if timed:
        # Ties say nothing either way: the sign test leaves them out.
        out["p"] = sign_p(wins if med_a < med_b else losses, wins + losses)
    noise = max(TIME_TOLERANCE_MS, TIME_TOLERANCE * max(med_a, med_b)) if timed else 0.0
    # (a tie is no win: the same count of messages is not fewer)
    favours = med_a < med_b and wins * 2 > len(pairs)
    against = med_a >= med_b and wins * 2 < len(pairs)
    if len(pairs) < min_pairs:
        verdict, why = "inconclusive", f"{len(pairs)} trial pair(s); {min_pairs} needed"
    elif timed and abs(med_a - med_b) <= noise:
        verdict, why = "inconclusive", f"the medians differ by no more than {noise:.1f} {unit}"
    elif not favours and not against:
        verdict, why = "inconclusive", "the medians and the trial pairs disagree"
    elif timed and out["p"] > SIGNIFICANCE:
        k, n = (wins if favours else losses), wins + losses
        need = next(j for j in range(n + 2) if j > n or sign_p(j, n) <= SIGNIFICANCE)
        verdict = "inconclusive"
        why = (f"{k} of {n} pairs agree, which chance alone gives {out['p']:.0%} of the time "
               f"(sign test; {need} of {n} would tell)" if need <= n else
               f"{k} of {n} pairs agree, which chance alone gives {out['p']:.0%} of the time")
    else:
        verdict, why = ("holds" if favours else "does not hold"), ""
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
                  compare(results, scn, "proposed", "register-then-switch", "switch_ms",
                          "switch", "ms", MIN_TIME_PAIRS, timed=True)]
        context = [compare(results, scn, "proposed", "reinvite", k, w, u, n, timed=t)
                   for k, w, u, n, t in (("messages", "messages", "", 1, False),
                                         ("switch_ms", "switch", "ms", MIN_TIME_PAIRS, True))]
        parts.append({"scenario": scn, "verdict": _combine([c["verdict"] for c in checks]),
                      "checks": checks, "context": context})
    measured = sum(1 for p in parts if p["verdict"] != "not measured")
    return {"claim": "the proposed link switch uses fewer signalling messages and less "
                     "time than register-then-switch, for each trigger",
            "verdict": _combine([p["verdict"] for p in parts]), "parts": parts,
            "scope": f"{measured} of {len(parts)} triggers measured"}


def _claim_b(results: Sequence[Result]) -> dict[str, Any]:
    check = compare(results, "terminal-switch", "reuse", "renegotiate", "handover_ms",
                    "handover", "ms", MIN_TIME_PAIRS, timed=True)
    context = compare(results, "terminal-switch", "reuse", "renegotiate", "gap_ms",
                      "largest media gap", "ms")
    return {"claim": "key reuse makes the terminal switch faster than renegotiating first",
            "verdict": check["verdict"], "checks": [check], "context": [context]}


def _claim_c(results: Sequence[Result]) -> dict[str, Any]:
    """On the wire and at the applications: a packet the receiver's host dropped is lost."""
    wire = _values(results, "link-planned", "proposed", "lost")
    app = _values(results, "link-planned", "proposed", "app_lost")
    lost = {t: max(v, app.get(t, 0.0)) for t, v in wire.items()}
    gaps = _values(results, "link-planned", "proposed", "gap_ms")
    out: dict[str, Any] = {"claim": "make-before-break (planned link switch, proposed method) "
                                    "loses no media", "trials": len(lost),
                           "lossless": sum(1 for v in lost.values() if v == 0),
                           "lost_max": max(lost.values()) if lost else None,
                           "gap_median_ms": statistics.median(gaps.values()) if gaps else None,
                           "voice_interval_ms": VOICE_INTERVAL_MS}
    if not lost:
        return {**out, "verdict": "not measured", "why": "no ok trials of link-planned/proposed"}
    if out["lossless"] < len(lost):
        return {**out, "verdict": "does not hold"}
    if len(lost) < MIN_LOSS_TRIALS:
        return {**out, "verdict": "inconclusive",
                "why": f"{len(lost)} trial(s); {MIN_LOSS_TRIALS} needed"}
    return {**out, "verdict": "holds"}


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
    if "p" in c and c["verdict"] != "inconclusive":
        text += f" (sign test p {c['p']:.2f})"
    return text + (f" — {c['why']}" if c.get("why") else "")


def markdown(claim_set: dict[str, dict[str, Any]]) -> list[str]:
    """The claims section of results.md, as lines."""
    lines = ["## Claims", "",
             "Each claim of the paper, with this run's verdict. *holds*: the medians and the "
             "trial pairs agree with it — for a time, so many pairs that chance alone would "
             f"rarely give as many (one-sided sign test, p <= {SIGNIFICANCE:g}; a switch "
             f"waits for the next voice packet, up to {VOICE_INTERVAL_MS} ms); "
             "*inconclusive*: they disagree, the pairs could be chance, the medians differ by "
             f"no more than the noise ({TIME_TOLERANCE_MS:g} ms or {TIME_TOLERANCE:.0%}), or "
             f"there are fewer than {MIN_TIME_PAIRS} pairs for a time; *does not hold*: both "
             "go against it as clearly; *not measured*: a method has no ok trial. A claim "
             "with parts holds when every measured part does.", ""]
    a, b, c = claim_set["a"], claim_set["b"], claim_set["c"]
    lines.append(f"* **(a) {a['verdict']}** — claim: {a['claim']} ({a['scope']}).")
    for part in a["parts"]:
        if part["verdict"] == "not measured":
            lines.append(f"  * {part['scenario']}: not measured")
            continue
        lines.append(f"  * {part['scenario']}: {part['verdict']} — "
                     + "; ".join(_check_text(ch) for ch in part["checks"]))
        ctx = [ch for ch in part.get("context", []) if ch["verdict"] != "not measured"]
        if ctx:
            lines.append("    * beside re-INVITE (not part of the claim): "
                         + "; ".join(_check_text(ch) for ch in ctx))
    lines.append(f"* **(b) {b['verdict']}** — claim: {b['claim']}: "
                 f"{_check_text(b['checks'][0])}.")
    ctx = b["context"][0]
    if ctx["verdict"] != "not measured":
        lines.append(f"  * for context, not part of the claim: {_check_text(ctx)}")
    if c["verdict"] == "not measured":
        lines.append(f"* **(c) not measured** — claim: {c['claim']} ({c['why']}).")
    else:
        gap = c["gap_median_ms"]
        gap_text = (f"; largest media gap {_num(gap, 'ms')} (median; a voice packet every "
                    f"{c['voice_interval_ms']} ms)" if gap is not None else "")
        why = f" — {c['why']}" if c.get("why") else ""
        lines.append(f"* **(c) {c['verdict']}** — claim: {c['claim']}: no packet lost (on the "
                     f"wire or at the applications) in {c['lossless']} of {c['trials']} "
                     f"trials (most lost in one: {c['lost_max']:.0f}){gap_text}{why}.")
    return lines
