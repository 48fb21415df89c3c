"""Online Elastic Weight Consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018).

After each experience the diagonal empirical Fisher information of the trainable weights is
estimated on that experience's data (each sample's squared gradient weighted by the model's
probability of its label) and accumulated; training then pays
``lambda / 2 * sum(F * (theta - theta_star)^2)`` for moving weights that mattered before.

With ``similarity_scaling = P != 0``, ``lambda`` of each experience is multiplied by the task
similarity factor of :mod:`cvm_edge.lab.similarity` (new classes close to old ones: hold weights harder).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from cvm_edge.augment import to_input
from cvm_edge.lab.similarity import experience_factor
from cvm_edge.strategy import Batch, Context, Output, Plugin, restricted_logits, targets_in

log = logging.getLogger(__name__)


class EwcPlugin(Plugin):
    name = "ewc"

    def __init__(
        self, lam: float = 100.0, decay: float = 1.0, samples: int = 512, similarity_scaling: float = 0.0
    ) -> None:
        if lam < 0 or not 0 <= decay <= 1 or samples < 1:
            raise ValueError("ewc lambda must be >= 0, decay in [0, 1], samples >= 1")
        self.lam = lam
        self.decay = decay
        self.samples = samples
        self.similarity_scaling = similarity_scaling
        self.factor = 1.0  # this experience's similarity factor (1 unless scaling is on)
        self.fisher: dict[str, torch.Tensor] = {}
        self.star: dict[str, torch.Tensor] = {}
        # (parameter, Fisher, anchor) on the training device for this experience: copied once in
        # before_experience, not per step (a host-to-device copy per step would also break a CUDA graph).
        self._terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    @property
    def effective_lambda(self) -> float:
        return self.lam * self.factor

    def before_experience(self, ctx: Context) -> None:
        self.factor = experience_factor(ctx, self.similarity_scaling)
        self._terms = []
        for name, p in ctx.model.named_parameters():
            f = self.fisher.get(name)
            if f is None or not p.requires_grad or f.shape != p.shape:
                continue
            self._terms.append((p, f.to(p.device), self.star[name].to(p.device)))
        if self.similarity_scaling:
            log.info("ewc lambda %g x similarity factor %.3f = %.4g", self.lam, self.factor, self.effective_lambda)

    def loss(self, ctx: Context, batch: Batch, out: Output) -> torch.Tensor | None:
        if not self._terms or self.effective_lambda == 0:
            return None
        total = torch.zeros((), device=ctx.device)
        for p, f, star in self._terms:
            total = total + (f * (p - star) ** 2).sum()
        return 0.5 * self.effective_lambda * total

    def after_experience(self, ctx: Context) -> None:
        model = ctx.model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        data = ctx.new_data
        n = min(self.samples, len(data))
        idx = ctx.rng.choice(len(data), size=n, replace=False)
        model.eval()
        # Empirical Fisher from per-sample gradients of the log-likelihood of the true label, each
        # weighted by the model's probability of that label (as mammoth's oEWC): the few samples the
        # model gets wrong have the largest gradients, and unweighted they inflate F until an SGD
        # step on lambda * F * dtheta overshoots (seen as NaN losses at 50 epochs per task).
        for i in idx:
            inp = to_input(torch.from_numpy(data.pixels[i : i + 1]).to(ctx.device), ctx.prep)
            if ctx.cached:
                inp = model.features(inp)
            _, logits = ctx.forward_head(model, inp)
            y = torch.from_numpy(data.labels[i : i + 1]).to(ctx.device)
            loss = F.cross_entropy(restricted_logits(logits, ctx.seen), targets_in(y, ctx.seen))
            weight = torch.exp(-loss.detach())  # p(y | x)
            model.zero_grad(set_to_none=True)
            loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += weight * p.grad.detach() ** 2
        model.zero_grad(set_to_none=True)
        for name in fisher:
            fisher[name] /= max(1, n)
            old = self.fisher.get(name)
            if old is not None and old.shape == fisher[name].shape:
                fisher[name] += self.decay * old.to(fisher[name].device)
        self.fisher = {k: v.detach().cpu() for k, v in fisher.items()}
        self.star = {k: p.detach().cpu().clone() for k, p in params.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"fisher.{k}": v for k, v in self.fisher.items()}
        out.update({f"star.{k}": v for k, v in self.star.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher.") :]: v for k, v in state.items() if k.startswith("fisher.")}
        self.star = {k[len("star.") :]: v for k, v in state.items() if k.startswith("star.")}
