"""TensorBoard event files of a run (`hfgan train --tensorboard DIR`, config `runtime.tensorboard_dir`).

Written by the run's recorder (recorder.py) at the end of each round, with the round as the step:

    score/<domain>                     generation score (rounds that are evaluated)
    loss/<domain>/<g_loss|d_loss_real|d_loss_fake>   mean training losses of the domain's clients
    loss/all/<...>                     mean over all clients
    time/round_wall_s                  wall time of the round
    time/step_s_mean                   mean measured step time of the clients
    latency/modelled_iteration_s       the planner's modelled iteration latency for the round's cut bits
    traffic/bytes_sent                 bytes sent by every role so far (when the runtime can tell)
    clients/arrived, clients/late, clients/dropped
    samples/cluster_<k>                the round's sample grid of cluster k (an image)

and once at the end: `utility/<domain>/<accuracy|precision|recall|f1|fpr>` and `score_final/<domain>` at the last
round. Read them with `tensorboard --logdir DIR`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardLog:
    """A SummaryWriter on DIR; every method writes and flushes (a run may be stopped at any time)."""

    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def round(
        self,
        record: Mapping[str, Any],
        samples: Mapping[int, Path],
        *,
        latency_s: float | None,
        bytes_sent: int | None,
    ) -> None:
        """One round: `record` is its metrics.jsonl record, `samples` the sample grid file of each cluster."""
        r, w = int(record["round"]), self.writer
        for dom, s in (record.get("generation_score") or {}).items():
            w.add_scalar(f"score/{dom}", float(s), r)
        for dom, losses in (record.get("train_by_domain") or {}).items():
            for k, v in losses.items():
                w.add_scalar(f"loss/{dom}/{k}", float(v), r)
        for k, v in (record.get("train") or {}).items():
            w.add_scalar(f"loss/all/{k}", float(v), r)
        w.add_scalar("time/round_wall_s", float(record.get("wall_s", 0.0)), r)
        steps = list((record.get("step_s") or {}).values())
        if steps:
            w.add_scalar("time/step_s_mean", sum(steps) / len(steps), r)
        if latency_s is not None:
            w.add_scalar("latency/modelled_iteration_s", float(latency_s), r)
        if bytes_sent is not None:
            w.add_scalar("traffic/bytes_sent", float(bytes_sent), r)
        w.add_scalar("clients/arrived", float(len(record.get("arrived") or [])), r)
        w.add_scalar("clients/late", float(len(record.get("late") or {})), r)
        w.add_scalar("clients/dropped", float(len(record.get("dropped") or {})), r)
        for k, path in sorted(samples.items()):
            w.add_image(f"samples/cluster_{k}", read_png(path), r, dataformats="HWC")
        w.flush()

    def final(self, round: int, domains: Mapping[str, Any]) -> None:
        """The final evaluation (summary.json's `domains`) at the last round."""
        for dom, res in domains.items():
            if res.get("generation_score") is not None:
                self.writer.add_scalar(f"score_final/{dom}", float(res["generation_score"]), round)
            for k in ("accuracy", "precision", "recall", "f1", "fpr"):
                if k in (res.get("utility") or {}):
                    self.writer.add_scalar(f"utility/{dom}/{k}", float(res["utility"][k]), round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_png(path: Path):
    """A PNG as an HxWx3 uint8 array."""
    import numpy as np
    from matplotlib import image

    img = image.imread(str(path))
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])
