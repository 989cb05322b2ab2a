"""Benchmarks that answer questions about the method: `hfgan bench quality` (HuSCF-GAN against its ablations and
baselines on the same data, budget and seeds, written up as a report). See quality.py."""

from .quality import METHODS, SPLIT_METHODS, BenchSettings, best_uniform_cut, run_bench

__all__ = ["METHODS", "SPLIT_METHODS", "BenchSettings", "best_uniform_cut", "run_bench"]
