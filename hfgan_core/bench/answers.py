"""The quality bench's answers and claim verdicts, computed from the methods' results alone.

Each question ("does HuSCF-GAN beat X on metric M in domain D?") gets yes / no / no (tie) with both values and the
difference; each of the paper's headline claims gets a verdict (holds / holds partly / does not hold at this scale)
with the measured ratios or gains as evidence and the rule that decided it. Which methods take part in which
comparison is each method's `Role` in `methods.REGISTRY`.
"""

from __future__ import annotations

import math
from typing import Any

from .methods import REFERENCE, REGISTRY, label, questioned, with_role

METRICS = ("accuracy", "generation score")


def accuracy(res: dict[str, Any], d: str) -> float | None:
    u = res.get("domains", {}).get(d, {}).get("utility") or {}
    v = u.get("accuracy")
    return float(v) if v is not None else None


def final_score(res: dict[str, Any], d: str) -> float | None:
    v = res.get("domains", {}).get(d, {}).get("generation_score")
    return float(v) if v is not None else None


def best_score(res: dict[str, Any], d: str) -> float | None:
    hist = res.get("domains", {}).get(d, {}).get("history") or []
    vals = [float(s) for _, s in hist if s is not None and math.isfinite(float(s))]
    return max(vals) if vals else None


def compare(results: dict[str, Any], other: str, domain: str, metric: str) -> dict[str, Any]:
    """Is HuSCF-GAN better than `other` on `metric` ("accuracy" or "generation score") in `domain`?"""
    get = accuracy if metric == "accuracy" else final_score
    q = f"Does {label(REFERENCE)} beat {label(other)} on {metric} in {domain}?"
    if REFERENCE not in results or other not in results:
        return {"question": q, "domain": domain, "metric": metric, "other": other, "answer": "not run"}
    h, o = get(results[REFERENCE], domain), get(results[other], domain)
    if h is None or o is None:
        return {"question": q, "domain": domain, "metric": metric, "other": other, "answer": "not measured"}
    unit, diff_unit = ("%", " pp") if metric == "accuracy" else ("", "")
    diff = h - o
    # A difference that does not show at the printed precision is a tie, not a win.
    answer = "yes" if diff >= 0.005 else ("no (tie)" if diff > -0.005 else "no")
    text = f"**{answer}**: {h:.2f}{unit} vs {o:.2f}{unit} ({diff:+.2f}{diff_unit})"
    return {
        "question": q,
        "domain": domain,
        "metric": metric,
        "other": other,
        "answer": answer,
        "huscf": h,
        "value": o,
        "difference": diff,
        "text": text,
    }


def questions(results: dict[str, Any], domains: list[str], group: str) -> list[dict[str, Any]]:
    """Every question of a group ("headline" or "further"): per domain, method and metric."""
    return [compare(results, other, d, metric) for d in domains for other in questioned(group) for metric in METRICS]


def _better(a: float, b: float) -> bool:
    """Better at the printed precision (two decimals): a difference that does not show is a tie."""
    return a - b >= 0.005


def _verdict(flags: list[bool], partial: list[bool] | None = None) -> str:
    if flags and all(flags):
        return "holds"
    if any(flags) or (partial and any(partial)):
        return "holds partly"
    return "does not hold"


def _claim(claim: str, verdict: str, evidence: list[str], rule: str) -> dict[str, Any]:
    return {"claim": claim, "verdict": verdict, "evidence": evidence, "rule": rule}


def _score_claim(h: dict[str, Any], results: dict[str, Any], baselines: list[str], domains: list[str]) -> list[dict]:
    """1. Generation score: 1.1x to 2.2x higher than the distributed baselines."""
    rows, flags, partial = [], [], []
    for b in baselines:
        for d in domains:
            hs, bs = final_score(h, d), final_score(results[b], d)
            if hs is None or bs is None or bs <= 0:
                continue
            ratio = hs / bs
            rows.append(f"{d} vs {label(b)}: {hs:.2f} / {bs:.2f} = {ratio:.2f}x")
            flags.append(ratio >= 1.1)
            partial.append(_better(hs, bs))
    if not rows:
        return []
    return [
        _claim(
            "1.1x to 2.2x higher generation scores than distributed GAN baselines",
            _verdict(flags, partial),
            rows,
            "holds if every ratio HuSCF-GAN / baseline is at least 1.1; partly if some are above 1",
        )
    ]


def _accuracy_claim(h: dict[str, Any], results: dict[str, Any], baselines: list[str], domains: list[str]) -> list[dict]:
    """2. Classification: ~10% better on average (up to 50% in multi-domain non-IID settings)."""
    rows, flags, partial = [], [], []
    for b in baselines:
        gains = []
        for d in domains:
            ha, ba = accuracy(h, d), accuracy(results[b], d)
            if ha is None or ba is None or ba <= 0:
                continue
            gains.append((ha - ba) / ba * 100)
            rows.append(f"{d} vs {label(b)}: {ha:.2f}% vs {ba:.2f}% ({(ha - ba) / ba * 100:+.1f}% relative)")
        if gains:
            mean = sum(gains) / len(gains)
            rows.append(f"mean relative gain over {label(b)}: {mean:+.1f}%")
            flags.append(mean >= 10.0)
            partial.append(mean > 0.0)
    if not rows:
        return []
    return [
        _claim(
            "about 10% better classification accuracy on average than the baselines (up to 50% "
            "in multi-domain non-IID settings)",
            _verdict(flags, partial),
            rows,
            "holds if the mean relative accuracy gain over each baseline is at least 10%; partly if it is positive",
        )
    ]


def _latency_claim(h: dict[str, Any], results: dict[str, Any], baselines: list[str]) -> list[dict]:
    """3. Latency: much lower modelled iteration latency than training the whole model on the devices."""
    rows, flags = [], []
    hl = h.get("modelled_latency_s")
    for b in baselines:
        bl = results[b].get("modelled_latency_s")
        if hl and bl:
            rows.append(f"vs {label(b)}: {hl:.3g} s vs {bl:.3g} s per iteration ({bl / hl:.1f}x lower)")
            flags.append(hl < bl)
    if not rows:
        return []
    return [
        _claim(
            "much lower (modelled) iteration latency than on-device training of the whole model",
            _verdict(flags),
            rows,
            "holds if HuSCF-GAN's modelled latency is lower than each baseline's",
        )
    ]


def _quality_ablation(h: dict[str, Any], other: str, res: dict[str, Any], what: str, domains: list[str]) -> list:
    """4. An ablation that should cost quality (clustering, KLD weighting)."""
    rows, flags, partial = [], [], []
    for d in domains:
        ha, oa = accuracy(h, d), accuracy(res, d)
        hs, os_ = final_score(h, d), final_score(res, d)
        if None in (ha, oa, hs, os_):
            continue
        rows.append(
            f"{d}: accuracy {ha:.2f}% vs {oa:.2f}% ({ha - oa:+.2f} pp), generation score "
            f"{hs:.2f} vs {os_:.2f} ({hs - os_:+.2f})"
        )
        flags.append(_better(ha, oa) and _better(hs, os_))
        partial.append(_better(ha, oa) or _better(hs, os_))
    if not rows:
        return []
    return [
        _claim(
            f"ablation: {what} (HuSCF-GAN vs {label(other)})",
            _verdict(flags, partial),
            rows,
            "holds if HuSCF-GAN is better on both accuracy and generation score in every domain; "
            "partly if better on either in some domain",
        )
    ]


def _cut_ablation(h: dict[str, Any], res: dict[str, Any]) -> list[dict]:
    """The heterogeneous cuts against the best uniform cut (modelled latency)."""
    hl, sl = h.get("modelled_latency_s"), res.get("modelled_latency_s")
    if not (hl and sl):
        return []
    return [
        _claim(
            "ablation: heterogeneous cuts lower the modelled latency below the best uniform cut",
            "holds" if hl < sl - 1e-12 else "does not hold",
            [f"HuSCF-GAN {hl:.4g} s vs same cut {sl:.4g} s per iteration ({(sl - hl) / sl * 100:.1f}% lower)"],
            "holds if the planned heterogeneous cuts have a strictly lower modelled latency",
        )
    ]


def _upper_bound(h: dict[str, Any], res: dict[str, Any], domains: list[str]) -> list[dict]:
    rows = []
    for d in domains:
        ha, ca = accuracy(h, d), accuracy(res, d)
        if ha is not None and ca is not None:
            rows.append(f"{d}: HuSCF-GAN {ha:.2f}% vs centralized {ca:.2f}% ({ha - ca:+.2f} pp)")
    if not rows:
        return []
    return [_claim("context: the gap to the centralized upper bound (not a paper claim)", "info", rows, "")]


def claims(results: dict[str, Any], domains: list[str]) -> list[dict[str, Any]]:
    """The paper's headline claims checked against this bench's numbers."""
    h = results.get(REFERENCE)
    if h is None:
        return []
    baselines = [b for b in with_role(distributed=True) if b in results]
    out = _score_claim(h, results, baselines, domains)
    out += _accuracy_claim(h, results, baselines, domains)
    out += _latency_claim(h, results, baselines)
    for m in REGISTRY:
        if m.role.quality_claim and m.name in results:
            out += _quality_ablation(h, m.name, results[m.name], m.role.quality_claim, domains)
    for name in with_role(latency_claim=True):
        if name in results:
            out += _cut_ablation(h, results[name])
    for name in with_role(upper_bound=True):
        if name in results:
            out += _upper_bound(h, results[name], domains)
    return out


def failing(claim_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in claim_list if c["verdict"] in ("does not hold", "holds partly")]


__all__ = ["METRICS", "accuracy", "best_score", "claims", "compare", "failing", "final_score", "questions"]
