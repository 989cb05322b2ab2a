"""The same conditional GAN trained unsplit in one process: the reference for split equivalence and benchmarks.

One step is exactly the paper's: G forward; D on the detached fakes (target 0), backward; D on the reals
(target 1), backward; Adam step on D; D (updated) on the same fakes (target 1), backward into G; Adam step on G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..model import build_networks
from ..model.split import run_blocks
from .holder import make_adam, prepare_module


@dataclass
class StepLosses:
    d_loss_real: float
    d_loss_fake: float
    g_loss: float


class UnsplitGAN:
    def __init__(self, cfg: RunConfig, device: str = "cpu", seed: int | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        nets = build_networks(cfg.model, cfg.train.seed if seed is None else seed)
        self.G = {i: prepare_module(b, cfg, self.device) for i, b in enumerate(nets["G"])}
        self.D = {i: prepare_module(b, cfg, self.device) for i, b in enumerate(nets["D"])}
        self.opt_g = make_adam([p for b in self.G.values() for p in b.parameters()], cfg)
        self.opt_d = make_adam([p for b in self.D.values() for p in b.parameters()], cfg)
        # Optional hook called as hook("D" | "G", modules) right before each optimizer step (tests record grads).
        self.before_step = None

    def modules(self) -> dict[str, dict[int, nn.Module]]:
        return {"G": self.G, "D": self.D}

    def generate(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.G, range(len(self.G)), z, labels)

    def discriminate(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.D, range(len(self.D)), images, labels)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, z: torch.Tensor) -> StepLosses:
        images, labels, z = images.to(self.device), labels.to(self.device), z.to(self.device)
        self.opt_d.zero_grad(set_to_none=True)
        fake = self.generate(z, labels)
        out_f = self.discriminate(fake.detach(), labels)
        loss_f = F.binary_cross_entropy(out_f, torch.zeros_like(out_f))
        loss_f.backward()
        out_r = self.discriminate(images, labels)
        loss_r = F.binary_cross_entropy(out_r, torch.ones_like(out_r))
        loss_r.backward()
        if self.before_step:
            self.before_step("D", self.D)
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        out_g = self.discriminate(fake, labels)
        loss_g = F.binary_cross_entropy(out_g, torch.ones_like(out_g))
        # Only G's gradients: D's weight gradients of this pass would be thrown away by the next D step's
        # zero_grad, and leaving them out skips their kernels (the gradients G gets are bit-identical;
        # ARCHITECTURE.md section 3, "The G step's backward").
        torch.autograd.backward(loss_g, inputs=[p for b in self.G.values() for p in b.parameters()])
        if self.before_step:
            self.before_step("G", self.G)
        self.opt_g.step()
        return StepLosses(float(loss_r.detach()), float(loss_f.detach()), float(loss_g.detach()))
