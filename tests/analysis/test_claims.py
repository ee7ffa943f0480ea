"""The claims check: verdicts from medians and trial pairs, and how results.md says them."""

from __future__ import annotations

from typing import Any

from experiments.claims import MIN_TIME_PAIRS, claims, compare, markdown


def r(scenario: str, method: str, trial: int, handover: float, messages: int = 34,
      lost: int = 0, gap: float = 25.0, ok: bool = True, detection: float = 0.0,
      app_lost: int | None = None) -> dict[str, Any]:
    return {"scenario": scenario, "method": method, "trial": trial, "ok": ok,
            "handover_ms": handover, "detection_ms": detection,
            "switch_ms": handover - detection, "messages": messages, "lost": lost,
            "app_lost": lost if app_lost is None else app_lost, "gap_ms": gap}


def link(scenario: str, proposed: list[float], baseline: list[float],
         msgs: tuple[int, int] = (32, 36)) -> list[dict[str, Any]]:
    return [*(r(scenario, "proposed", i, h, msgs[0]) for i, h in enumerate(proposed, 1)),
            *(r(scenario, "register-then-switch", i, h, msgs[1])
              for i, h in enumerate(baseline, 1))]


def test_holds_when_median_and_the_pairs_agree_beyond_chance() -> None:
    assert MIN_TIME_PAIRS == 5  # 1/32 <= 0.05 < 1/16
    c = compare(link("link-planned", [30, 29, 33, 28, 31], [38, 37, 36, 39, 35]),
                "link-planned", "proposed", "register-then-switch", "handover_ms", "handover",
                "ms", MIN_TIME_PAIRS, True)
    assert (c["verdict"], c["medians"], c["pairs"], c["wins"]) == ("holds", [30, 37], 5, 5)
    assert c["p"] == 1 / 32
    # Ties tell nothing: 5 wins and a tie is still 5 of 5 for the sign test.
    tie = compare(link("link-planned", [30, 29, 33, 28, 31, 36], [38, 37, 36, 39, 35, 36]),
                  "link-planned", "proposed", "register-then-switch", "handover_ms",
                  "handover", "ms", MIN_TIME_PAIRS, True)
    assert (tie["verdict"], tie["p"]) == ("holds", 1 / 32)


def test_most_pairs_that_chance_could_give_are_inconclusive() -> None:
    # Median and 4 of 5 pairs favour proposed: 6 in 32 by chance alone.
    c = compare(link("link-planned", [30, 29, 41, 28, 31], [38, 37, 36, 39, 35]),
                "link-planned", "proposed", "register-then-switch", "handover_ms", "handover",
                "ms", MIN_TIME_PAIRS, True)
    assert (c["verdict"], c["p"]) == ("inconclusive", 6 / 32)
    assert c["why"] == ("4 of 5 pairs agree, which chance alone gives 19% of the time "
                        "(sign test; 5 of 5 would tell)")
    # The same against the claim is not "does not hold" either.
    d = compare(link("link-planned", [38, 37, 36, 39, 32], [30, 29, 41, 28, 31]),
                "link-planned", "proposed", "register-then-switch", "handover_ms", "handover",
                "ms", MIN_TIME_PAIRS, True)
    assert (d["verdict"], d["wins"], d["p"]) == ("inconclusive", 1, 6 / 32)


def test_a_difference_within_the_noise_is_inconclusive() -> None:
    c = compare(link("link-carrier-loss", [42.2, 41, 43, 40, 44], [42.0, 41.5, 43.5, 40.5, 44.5]),
                "link-carrier-loss",
                "proposed", "register-then-switch", "handover_ms", "handover", "ms",
                MIN_TIME_PAIRS, True)
    assert (c["verdict"], c["why"]) == ("inconclusive",
                                        "the medians differ by no more than 1.3 ms")


def test_does_not_hold_when_both_go_against() -> None:
    c = compare(link("link-planned", [40, 41, 39, 42, 43], [38, 37, 36, 39, 35]),
                "link-planned", "proposed", "register-then-switch", "handover_ms", "handover",
                "ms", MIN_TIME_PAIRS, True)
    assert (c["verdict"], c["wins"], c["p"]) == ("does not hold", 0, 1 / 32)


def test_inconclusive_when_median_and_pairs_disagree_or_too_few_pairs() -> None:
    # Median favours proposed (20 < 31), but it wins only 2 of 5 pairs.
    rows = link("link-planned", [20, 19, 45, 44, 18], [31, 31, 31, 31, 10])
    c = compare(rows, "link-planned", "proposed", "register-then-switch", "handover_ms",
                "handover", "ms", MIN_TIME_PAIRS, True)
    assert (c["verdict"], c["why"]) == ("inconclusive", "the medians and the trial pairs disagree")
    one = compare(link("link-planned", [30], [40]), "link-planned", "proposed",
                  "register-then-switch", "handover_ms", "handover", "ms", MIN_TIME_PAIRS)
    assert (one["verdict"], one["why"]) == ("inconclusive", "1 trial pair(s); 5 needed")
    # Counts are a property of the procedure: one pair decides.
    msgs = compare(link("link-planned", [30], [40]), "link-planned", "proposed",
                   "register-then-switch", "messages", "messages", "", 1)
    assert msgs["verdict"] == "holds"


def test_claim_a_per_trigger_and_overall() -> None:
    rows = [*link("link-planned", [30, 29, 31, 30, 28], [38, 37, 36, 39, 35]),
            *link("link-blackhole", [430, 429, 440, 431, 428], [450, 455, 460, 452, 451])]
    a = claims(rows)["a"]
    assert {p["scenario"]: p["verdict"] for p in a["parts"]} == {
        "link-planned": "holds", "link-blackhole": "holds", "link-carrier-loss": "not measured"}
    assert a["verdict"] == "holds" and a["scope"] == "2 of 3 triggers measured"
    # Times after detection: a head start in detecting the fault is not the method's.
    late = [r("link-blackhole", m, i, 300 + d + 30, detection=300 + d)
            for i, (m, d) in enumerate([("proposed", 0), ("register-then-switch", 20)] * 5)]
    for i, row in enumerate(late):
        row["trial"] = i // 2 + 1
    part = claims(late)["a"]["parts"][2]
    assert part["scenario"] == "link-blackhole"
    # (the same message count is not fewer messages)
    assert [c["verdict"] for c in part["checks"]] == ["does not hold", "inconclusive"]
    # More messages fails the claim even when faster.
    worse = claims(link("link-planned", [30, 29, 31, 30, 28], [38, 37, 36, 39, 35],
                        msgs=(40, 36)))["a"]
    assert worse["verdict"] == "does not hold"


def test_claims_b_and_c_and_failed_trials() -> None:
    rows = [r("terminal-switch", "reuse", i, h, gap=60)
            for i, h in enumerate([50, 49, 52, 51, 48], 1)]
    rows += [r("terminal-switch", "renegotiate", i, h, gap=35)
             for i, h in enumerate([80, 70, 90, 75, 85], 1)]
    rows += [r("link-planned", "proposed", 1, 30, lost=0),
             r("link-planned", "proposed", 2, 30, lost=2),
             r("link-planned", "proposed", 3, 30, ok=False)]
    c = claims(rows)
    assert c["b"]["verdict"] == "holds"
    assert c["b"]["context"][0]["verdict"] == "does not hold"  # gap: told, not judged
    assert (c["c"]["verdict"], c["c"]["trials"], c["c"]["lossless"], c["c"]["lost_max"]) == \
        ("does not hold", 2, 1, 2)


def test_claim_c_counts_application_losses_and_needs_three_trials() -> None:
    two = [r("link-planned", "proposed", i, 30) for i in (1, 2)]
    assert claims(two)["c"]["verdict"] == "inconclusive"
    three = [*two, r("link-planned", "proposed", 3, 30)]
    assert claims(three)["c"]["verdict"] == "holds"
    dropped = [*two, r("link-planned", "proposed", 3, 30, lost=0, app_lost=1)]
    assert claims(dropped)["c"]["verdict"] == "does not hold"


def test_not_measured_everywhere_without_trials() -> None:
    c = claims([r("link-planned", "proposed", 1, 30, ok=False)])
    assert {k: v["verdict"] for k, v in c.items()} == {
        "a": "not measured", "b": "not measured", "c": "not measured"}
    text = "\n".join(markdown(c))
    assert "None" not in text
    assert "* **(c) not measured** — claim: make-before-break" in text
    assert "no ok trials of link-planned/proposed" in text


def test_markdown_says_the_numbers() -> None:
    rows = [*link("link-planned", [29.5, 30, 31, 30, 29], [37.5, 38, 36, 39, 37]),
            *(r("link-planned", "proposed", i, 30, gap=26.4) for i in (6,))]
    text = "\n".join(markdown(claims(rows)))
    assert ("  * link-planned: holds — messages 32 vs 36 (medians); lower in 5 of 5 trial pairs; "
            "switch 30 ms vs 37.5 ms (medians); lower in 5 of 5 trial pairs "
            "(sign test p 0.03)") in text
    assert ("no packet lost (on the wire or at the applications) in 6 of 6 trials "
            "(most lost in one: 0)") in text
    assert "largest media gap 25 ms (median; a voice packet every 20 ms)" in text
