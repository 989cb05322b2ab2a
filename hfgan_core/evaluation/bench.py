"""Timing of the evaluation on this machine: `python -m hfgan_core.evaluation.bench --data-dir D [--out FILE]`.

Measures (one table on stdout, the same numbers as JSON in `--out`):
- fitting the MNIST scoring classifier on the full 60k training split (`--fit-epochs`), and its test accuracy;
- the generation score at 5,000 samples with the default cgan28 generator (random weights, eval mode);
- the utility metric's parts at 30,000 samples: generating them with that generator, and training the utility CNN
  for `--utility-epochs` epochs (15 is the paper's; fewer gives an estimate scaled linearly to 15).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .classifiers import fit_classifier
from .metrics import generation_score, sample_generator
from .models import UTILITY_ARCH, build_model
from .outputs import write_json_atomic
from .training import as_tensors, seeded_init, train_supervised


def cgan28_generator(seed: int = 0):
    """The default generator, composed unsplit from its blocks, in eval mode."""
    from ..model import build_networks

    blocks = build_networks(ModelConfig(), seed)["G"]
    for b in blocks:
        b.eval()

    def generate(labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = blocks[0](z, labels)
        for b in blocks[1:]:
            x = b(x)
        return x

    return generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="/work/shared/datasets")
    ap.add_argument("--fit-epochs", type=int, default=3, help="0 skips the classifier fit")
    ap.add_argument("--score-samples", type=int, default=5000)
    ap.add_argument("--utility-samples", type=int, default=30000)
    ap.add_argument("--utility-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/evaluation.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, float, str]] = []
    result: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
    }

    from ..data import load_domain

    domain = load_domain("MNIST", args.data_dir)
    x_test, y_test = as_tensors(domain.test)
    if args.fit_epochs > 0:
        t0 = time.perf_counter()
        clf, acc = fit_classifier(domain.train, domain.test, epochs=args.fit_epochs, seed=0)
        fit_s = time.perf_counter() - t0
        result["fit"] = {"epochs": args.fit_epochs, "seconds": fit_s, "test_accuracy": acc}
        rows.append((f"fit MNIST scoring classifier, 60k x {args.fit_epochs} epochs", fit_s, f"test acc {acc:.2f}%"))
    else:
        clf = build_model("scoring-cnn-v1").eval()

    generate = cgan28_generator()
    t0 = time.perf_counter()
    score = generation_score(generate, clf, args.score_samples, generator=torch.Generator().manual_seed(0))
    score_s = time.perf_counter() - t0
    result["generation_score"] = {"samples": args.score_samples, "seconds": score_s, "score": score}
    rows.append((f"generation score, {args.score_samples} samples (cgan28 G)", score_s, f"score {score:.3f}"))

    t0 = time.perf_counter()
    sampled = sample_generator(generate, args.utility_samples, generator=torch.Generator().manual_seed(1))
    gen_s = time.perf_counter() - t0
    assert sampled is not None
    rows.append((f"utility: generate {args.utility_samples} samples (cgan28 G)", gen_s, ""))
    model = seeded_init(lambda: build_model(UTILITY_ARCH), 0)
    t0 = time.perf_counter()
    train_supervised(model, sampled[0], sampled[1], epochs=args.utility_epochs, seed=0)
    train_s = time.perf_counter() - t0
    per_epoch = train_s / max(args.utility_epochs, 1)
    rows.append((f"utility: train CNN {args.utility_epochs} epoch(s)", train_s, f"{per_epoch:.1f} s/epoch"))
    total15 = gen_s + 15 * per_epoch
    rows.append(("utility: 30k x 15 epochs (generate + train, est.)", total15, "scaled from the epochs run"))
    result["utility"] = {
        "samples": args.utility_samples,
        "generate_s": gen_s,
        "epochs_run": args.utility_epochs,
        "train_s": train_s,
        "train_s_per_epoch": per_epoch,
        "estimated_total_15_epochs_s": total15,
    }

    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'seconds':>9}  note")
    for name, secs, note in rows:
        print(f"{name:<{width}}  {secs:>9.1f}  {note}")
    out = Path(args.out)
    write_json_atomic(out, result)
    print(f"wrote {out}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
