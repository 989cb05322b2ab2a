"""The quality bench's `report.md`: one small function per section, each rendering part of report.json.

`markdown(rep, cfg)` joins the sections in the report's order. Everything a section says comes from the report's
numbers (report.json) and the run config; method names and descriptions come from `methods.REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from .answers import best_score, failing, final_score
from .methods import LATENCY_MODELS, REFERENCE, REGISTRY, label, with_role

# The paper's reference implementation at paper scale (50 rounds, 20 clients per domain): utility accuracy, %.
PAPER_ACCURACY = {
    "s1": {"MNIST": 97.87},
    "s2": {"MNIST": 97.17},
    "s3": {"MNIST": 96.83, "FashionMNIST": 82.93},
    "s4": {"MNIST": 96.21, "FashionMNIST": 81.90},
    "s5": {"MNIST": 96.15, "FashionMNIST": 81.46},
    "s6": {"MNIST": 95.94, "FashionMNIST": 81.94, "KMNIST": 72.91, "NotMNIST": 88.30},
}


def fmt(v: Any, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def groups(clusters: dict[str, int]) -> str:
    by: dict[int, list[int]] = {}
    for c, k in sorted(((int(c), int(k)) for c, k in clusters.items())):
        by.setdefault(k, []).append(c)
    return " ".join("{" + ",".join(map(str, v)) + "}" for _, v in sorted(by.items()))


def matches_domains(clusters: dict[str, int], domain_of: dict[int, str]) -> bool:
    by: dict[int, set[str]] = {}
    for c, k in clusters.items():
        by.setdefault(int(k), set()).add(domain_of[int(c)])
    doms = set(domain_of.values())
    return all(len(v) == 1 for v in by.values()) and len(by) == len(doms)


@dataclass(frozen=True)
class Doc:
    """What every section reads: report.json's content and the bench's run config."""

    rep: dict[str, Any]
    cfg: RunConfig

    @property
    def results(self) -> dict[str, Any]:
        return self.rep["methods"]

    @property
    def domains(self) -> list[str]:
        return list(self.cfg.scenario.domain_names)

    @property
    def has_fd(self) -> bool:
        """Whether any method measured the classifier FD (reports made before it existed have no such column)."""
        return any(
            r.get("domains", {}).get(d, {}).get("classifier_frechet_distance") is not None
            for r in self.results.values()
            for d in self.domains
        )

    @property
    def domain_of(self) -> dict[int, str]:
        return {int(r["client"]): r["domain"] for r in self.rep["scenario"]["clients"]}


def _header(doc: Doc) -> list[str]:
    rep, results = doc.rep, doc.results
    scale = "paper scale" if rep["paper_scale"] else "reduced scale"
    m = rep["machine"]
    L = [f"# Quality bench: scenario {doc.cfg.scenario.name} ({scale})", ""]
    L.append(f"Made by `{rep['command'] or 'hfgan bench quality'}` ({rep['created']}).")
    L.append(
        f"Machine: {m.get('processor')}, {m.get('cpus')} CPUs, torch {m.get('torch')} with "
        f"{m.get('threads')} threads, device `{m.get('device')}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f". Bench digest `{rep['digest'][:16]}`."
    )
    scorers = m.get("scoring_classifiers") or {}
    if scorers:
        L.append(
            "Scoring classifiers (the same for every method): "
            + "; ".join(
                f"{d} test accuracy {f['test_accuracy']:.2f}% (seed {f.get('seed')}, {f.get('epochs')} epochs, "
                f"file sha256 `{str(f['file_sha256'])[:12]}`)"
                for d, f in scorers.items()
            )
            + "."
        )
    L.append("")
    if any(src == "synthetic" and dom != "synthetic" for dom, src in rep["scenario"]["data_sources"].items()):
        L.append(
            "**Warning: some domains use the synthetic stand-in data set, not the real one: "
            + "; ".join(rep["scenario"]["notices"])
            + "**"
        )
        L.append("")
    missing = [mm.name for mm in REGISTRY if mm.name not in results]
    if missing:
        L.append(f"Not run (yet): {', '.join(label(mm) for mm in missing)}.")
        L.append("")
    return L


def _answers(doc: Doc) -> list[str]:
    rep = doc.rep
    L = ["## Answers", ""]
    L.append(
        "Generated from the numbers below. One seed per method; run-to-run variation was not measured, so "
        "small differences may not survive another seed."
    )
    L += ["", "| question | domain | answer |", "|---|---|---|"]
    for q in rep["answers"]:
        L.append(
            f"| {label(REFERENCE)} vs {label(q['other'])}: {q['metric']} | {q['domain']} | "
            f"{q.get('text', q['answer'])} |"
        )
    L += ["", "The paper's claims at this scale:", ""]
    for c in rep["claims"]:
        verdict = c["verdict"] if c["verdict"] == "info" else f"**{c['verdict']}**"
        L.append(f"- {c['claim']}: {verdict}. " + "; ".join(c["evidence"]) + ".")
        if c.get("rule"):
            L.append(f"  (Rule: {c['rule']}.)")
    L.append("")
    return L + _verdict_lines(doc) + _further_answers(doc)


def _verdict_lines(doc: Doc) -> list[str]:
    rep, cfg = doc.rep, doc.cfg
    L: list[str] = []
    if len(doc.domains) == 1 and cfg.train.n_clusters(cfg.scenario) == 1:
        L.append(
            "With one domain and as many clusters as domains, HuSCF-GAN forms a single cluster: it and "
            '"no clustering" are the same algorithm here, so their numbers can only differ by run-to-run '
            "nondeterminism, and the clustering ablation says nothing in this scenario."
        )
        L.append("")
    bad = failing(rep["claims"])
    if bad:
        L.append(
            "**Plainly: at this scale, " + "; ".join(f'the claim "{c["claim"]}" {c["verdict"]}' for c in bad) + ".**"
        )
        if not rep["paper_scale"]:
            L.append(
                "This is a reduced-scale run (see the scale factors): the paper trains 10x to 20x more clients "
                "for many more steps, so a claim that fails here is not refuted at paper scale, and one that "
                "holds here is not confirmed there."
            )
    else:
        L.append(
            "Every checked claim holds at this scale."
            if rep["claims"]
            else "No claim could be checked (HuSCF-GAN or the baselines were not run)."
        )
    L.append("")
    return L


def _further_answers(doc: Doc) -> list[str]:
    more = [q for q in doc.rep["more_answers"] if q["answer"] not in ("not run", "not measured")]
    if not more:
        return []
    L = ["Further comparisons:", "", "| HuSCF-GAN vs | metric | domain | answer |", "|---|---|---|---|"]
    for q in more:
        L.append(f"| {label(q['other'])} | {q['metric']} | {q['domain']} | {q['text']} |")
    L.append("")
    return L


def _results(doc: Doc) -> list[str]:
    L = ["## Results per domain", ""]
    fd = (
        " Classifier FD: the Fréchet distance between generated and real test images in the scoring classifier's "
        "feature space (lower is better; not FID: no Inception network; split methods only)."
        if doc.has_fd
        else ""
    )
    L.append(
        "Generation score: exp(E KL(p(y|x) || p(y))) with the domain's scoring classifier (max 10), final = "
        f"after the last round, best = best round.{fd} Utility: a CNN trained only on generated samples, tested on "
        "the real test set (%). Modelled latency: seconds per training iteration from the cost model (see "
        "*Latency and traffic*). Wall time: measured training time on this machine (evaluation excluded). "
        "Bytes: on the wire per round."
    )
    L.append("")
    for d in doc.domains:
        L += _domain_results(doc, d)
    if "utility_accuracy" in doc.rep["plots"]:
        L.append(f"![utility accuracy]({doc.rep['plots']['utility_accuracy']})")
        L.append("")
    return L


def _domain_results(doc: Doc, d: str) -> list[str]:
    results = doc.results
    L = [f"### {d}", ""]
    fd_head = " classifier FD |" if doc.has_fd else ""
    L.append(
        f"| method | final gen score | best gen score |{fd_head} accuracy | precision | recall | F1 | FPR | "
        "modelled latency (s/iter) | wall time train (min) | bytes/round |"
    )
    L.append("|---|---|---|" + ("---|" if doc.has_fd else "") + "---|---|---|---|---|---|---|---|")
    for meth, r in results.items():
        u = r["domains"].get(d, {}).get("utility") or {}
        fd = r["domains"].get(d, {}).get("classifier_frechet_distance")
        fd_cell = f" {fmt(fd, 1)} |" if doc.has_fd else ""
        L.append(
            f"| {label(meth)} | {fmt(final_score(r, d))} | {fmt(best_score(r, d))} |{fd_cell} "
            f"{fmt(u.get('accuracy'))} | "
            f"{fmt(u.get('precision'))} | {fmt(u.get('recall'))} | {fmt(u.get('f1'))} | "
            f"{fmt(u.get('fpr'))} | {fmt(r.get('modelled_latency_s'), 3)} | "
            f"{fmt(r.get('wall_train_s', 0) / 60, 1)} | {fmt_bytes(r.get('bytes_per_round'))} |"
        )
    L.append("")
    ref = PAPER_ACCURACY.get(doc.cfg.scenario.name, {})
    if d in ref:
        L.append(
            f"For orientation, the paper's reference implementation at paper scale reports {ref[d]:.2f}% "
            f"utility accuracy for HuSCF-GAN on {d} in this scenario."
        )
        L.append("")
    for meth, r in results.items():
        per_client = r.get("domains", {}).get(d, {}).get("per_client")
        if per_client:
            L.append(
                f"{label(meth).capitalize()}, per client: "
                + "; ".join(
                    f"client {c}: score {v['generation_score']:.2f}, accuracy {v['utility']['accuracy']:.2f}%"
                    for c, v in per_client.items()
                )
                + " (the table shows their mean)."
            )
            L.append("")
    key = f"generation_score_{d}"
    if key in doc.rep["plots"]:
        L.append(f"![{d}: generation score per round]({doc.rep['plots'][key]})")
        L.append("")
    return L + _score_history(doc, d)


def _score_history(doc: Doc, d: str) -> list[str]:
    results = doc.results
    L = ["Generation score per round:", ""]
    rounds = sorted({int(rr) for r in results.values() for rr, _ in r["domains"].get(d, {}).get("history", [])})
    L.append("| method | " + " | ".join(str(x) for x in rounds) + " |")
    L.append("|---|" + "---|" * len(rounds))
    for meth, r in results.items():
        h = {int(rr): s for rr, s in r["domains"].get(d, {}).get("history", [])}
        L.append(f"| {label(meth)} | " + " | ".join(fmt(h.get(x)) for x in rounds) + " |")
    L.append("")
    return L


def _samples(doc: Doc) -> list[str]:
    domains = doc.domains
    L = ["## Samples", ""]
    L.append(
        "One row per class (0 to 9), eight samples each, after the last round; the same noise for every method. "
        "FedGAN-style has one global model, so its grids are the same in every domain; local only shows the "
        "domain's first client (the other clients' grids are next to it in samples/)."
    )
    L += ["", "| method | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for meth, r in doc.results.items():
        grids = r.get("samples") or {}
        cells = [f"![{meth} {d}]({grids.get(d, '')})" if grids.get(d) else "-" for d in domains]
        L.append(f"| {label(meth)} | " + " | ".join(cells) + " |")
    L.append("")
    return L


def _clusters(doc: Doc) -> list[str]:
    ref = doc.results.get(REFERENCE)
    if not ref or not ref.get("clusters"):
        return []
    cfg, domain_of = doc.cfg, doc.domain_of
    L = [f"## Clusters found by {label(REFERENCE)}", ""]
    L.append(
        "Clients by cluster after each round (rounds before `kld_from_round` = "
        f"{cfg.train.kld_from_round} aggregate as one cluster). Client domains: "
        + ", ".join(f"{c}: {d}" for c, d in sorted(domain_of.items()))
        + "."
    )
    L += ["", "| round | clusters | one cluster per domain |", "|---|---|---|"]
    for row in ref["clusters"]:
        cl = row["clusters"]
        match = "yes" if matches_domains(cl, domain_of) else "no"
        if int(row["round"]) < cfg.train.kld_from_round:
            match += " (one cluster by design in this round)"
        L.append(f"| {row['round']} | {groups(cl)} | {match} |")
    L.append("")
    return L


def _scale(doc: Doc) -> list[str]:
    rep = doc.rep
    L = ["## Scale", ""]
    if rep["paper_scale"]:
        L.append("Paper scale: the preset unchanged (except options given on the command line).")
    else:
        ch = rep["scale_choice"]
        L.append(
            f"Reduced scale: the richest setting of the bench's ladder (step {ch.get('ladder')}) whose estimate "
            f"fits the {ch.get('budget_min'):g}-minute budget on the {ch['constants']['source']}, then the "
            "options given on the command line. Factor = here / paper."
        )
    L += ["", "| knob | paper | here | factor |", "|---|---|---|---|"]
    for f in rep["scale_factors"]:
        L.append(f"| {f['knob']} | {f['paper']} | {f['here']} | {fmt(f['factor'], 3)} |")
    L.append("")
    return L


def _scenario(doc: Doc) -> list[str]:
    cfg, results, sc = doc.cfg, doc.results, doc.rep["scenario"]
    L = ["## Scenario", ""]
    L.append(
        f"`{sc['name']}`: "
        + ", ".join(f"{d['dataset']} ({d['clients']} clients)" for d in sc["domains"])
        + f"; distribution `{sc['distribution']}` (label exclusions and size tiers as the reference draws them, "
        f"partition seed {cfg.scenario.partition_seed}); training seed {cfg.train.seed}; batch "
        f"{cfg.train.batch_size}, Adam lr {cfg.train.lr:g} betas {tuple(cfg.train.betas)}; "
        f"{results[next(iter(results))]['steps_per_round'] if results else '?'} steps per round for every "
        "method. Data: " + ", ".join(f"{k} from {v}" for k, v in sc["data_sources"].items()) + "."
    )
    cut_methods = [m for m in REGISTRY if m.role.cuts_column]
    L.append("")
    L.append(
        "| client | domain | samples | excluded labels | device | "
        + " | ".join(m.role.cuts_column for m in cut_methods)
        + " |"
    )
    L.append("|---|---|---|---|---|" + "---|" * len(cut_methods))
    for row in sc["clients"]:
        L.append(
            f"| {row['client']} | {row['domain']} | {row['samples']} | {row['excluded_labels'] or '-'} | "
            f"{row['device']} | " + " | ".join(str(row.get(f"cuts_{m.name}") or "-") for m in cut_methods) + " |"
        )
    L.append("")
    return L


def _methods(doc: Doc) -> list[str]:
    L = ["## Methods", ""]
    for m in REGISTRY:
        L.append(f"- **{m.label}** (`{m.name}`): {m.description}.")
    L.append("")
    L.append(
        "Every method uses the same client shards, seeds (the same per-client batch and noise streams as the "
        "split clients), initial weights, rounds, local epochs, steps per epoch, batch size and Adam settings, "
        "and the same evaluation sizes and seeds. Centralized is the upper bound per domain: one pooled model "
        "across domains would mix the domains under the same labels. The centralized model of a domain draws "
        "batch size x (clients in the domain) samples per step from the pool, as many as the domain's clients "
        "together in the federation."
    )
    L.append("")
    return L


def _latency(doc: Doc) -> list[str]:
    cfg, results = doc.cfg, doc.results
    server = cfg.devices.server
    L = ["## Latency and traffic", ""]
    L.append(
        f"Modelled latency per iteration, from the `{cfg.train.cost_model}` cost table at batch "
        f"{cfg.train.batch_size} and the device profiles above (server: "
        f"{server.computational_frequency_ghz:g} GHz x {server.cpu_cycles_per_flop:g}, "
        f"{server.transmission_rate_bps:g} B/s):"
    )
    L.append("")
    for model in LATENCY_MODELS:
        L.append(f"- {model.key}: {model.formula}.")
    for meth, r in results.items():
        exchange = (r.get("latency") or {}).get("round_exchange_s")
        if exchange:
            L.append(
                f"- {label(meth)} also exchanges the whole model once per round: about {exchange:.3g}"
                " s over the slowest client's link (not in the per-iteration number)."
            )
    L.append("")
    L.append(
        "Bytes on the wire per round, over the devices' links: split methods, what the clients sent (activations, "
        "gradients, model updates, control) plus what the server side sent to them (split replies, model "
        "assignments, round control), msgpack framing included, divided by the rounds (server-internal traffic "
        "between coordinator, aggregators and clustering is in report.json as bytes_all_roles); FedGAN-style, 2 x "
        "the full model's bytes x clients (upload and download, payload only); local only and centralized, "
        "0 per round (centralized needs the raw data uploaded once, which the data-sharing constraint "
        "forbids)."
    )
    L.append("")
    for name in with_role(latency_claim=True):
        if name in results:
            cuts = results[name].get("train_config", {}).get("cuts")
            L.append(
                f"{label(name).capitalize()} used `{cuts}` for every client: the uniform assignment with the lowest "
                "modelled latency among the 16."
            )
            L.append("")
    return L


def _time(doc: Doc) -> list[str]:
    L = ["## Time: estimated and measured", ""]
    L.append("| method | estimated (min) | training (min) | evaluation and setup (min) | total (min) |")
    L.append("|---|---|---|---|---|")
    for meth, r in doc.results.items():
        est = (r.get("estimate_s") or {}).get("total_s")
        L.append(
            f"| {label(meth)} | {fmt(est / 60 if est else None, 1)} | {fmt(r.get('wall_train_s', 0) / 60, 1)}"
            f" | {fmt(r.get('wall_eval_s', 0) / 60, 1)} | {fmt(r.get('wall_s', 0) / 60, 1)} |"
        )
    L.append("")
    L.append(
        "Per-method run directories (metrics.jsonl, summary.json, plots, per-round samples) are under `runs/`; "
        "`report.json` holds every number of this report."
    )
    L.append("")
    return L


SECTIONS = (_header, _answers, _results, _samples, _clusters, _scale, _scenario, _methods, _latency, _time)


def markdown(rep: dict[str, Any], cfg: RunConfig) -> str:
    """report.md from report.json's content and the bench's run config."""
    doc = Doc(rep, cfg)
    return "\n".join(line for section in SECTIONS for line in section(doc))


__all__ = ["PAPER_ACCURACY", "SECTIONS", "fmt", "fmt_bytes", "markdown"]
