"""The clustering service: activation summaries in, cluster assignment and KLD scores out.

Summaries are taken for the round the ledger says the run is in; those of any other round are rejected (stale):
the coordinator would refuse their result anyway, and clustering them is wasted work."""

from __future__ import annotations

from ..federation import cluster_clients
from ..model.architecture import architecture
from ..protocol import ActivationSummaries, ClusterResult, Message, expect_shape
from ..transport import CLUSTERING, COORDINATOR
from .host import Reject, Role, RoleContext


class ClusteringRole(Role):
    name = "clustering"
    accepts = (ActivationSummaries,)
    no_grad = True

    def __init__(self, ctx: RoleContext, summary_shape: tuple[int, ...] | None = None):
        super().__init__(ctx)
        if summary_shape is None:
            # The server's output of the summary block of D (128x7x7 for 28x28 images).
            arch = architecture(ctx.cfg.model)
            summary_shape = arch.discriminator.output_shapes[arch.summary_block]
        self.summary_shape = summary_shape
        self.results = 0

    def addresses(self) -> list[str]:
        return [CLUSTERING]

    def on_message(self, msg: Message) -> None:
        assert isinstance(msg, ActivationSummaries)
        if msg.sender != "server":
            raise Reject(f"bad_sender: summaries come from the server, not {msg.sender!r}")
        if not msg.summaries:
            raise Reject("malformed: no summaries")
        summaries = {}
        for key, tensor in msg.summaries.items():
            if not key.isdigit():
                raise Reject(f"malformed: summary key {key!r} is not a client index")
            expect_shape(f"activation_summaries.{key}", tensor, self.summary_shape)
            summaries[int(key)] = tensor.float()
        current, _ = self.ctx.store.get_round(self.ctx.run)
        if msg.round != current:
            # The coordinator takes results for its current round only: clustering another round is wasted work.
            raise Reject(f"stale: summaries for round {msg.round}, the run is at round {current}")
        cfg = self.ctx.cfg
        k = cfg.train.n_clusters(cfg.scenario)
        outcome = cluster_clients(summaries, k, seed=cfg.train.seed)
        self.results += 1
        self.send(
            COORDINATOR,
            ClusterResult(
                **self.envelope(msg.round),
                assignment={str(c): int(v) for c, v in outcome.assignment.items()},
                kld_intra={str(c): float(v) for c, v in outcome.kld_intra.items()},
                kld_global={str(c): float(v) for c, v in outcome.kld_global.items()},
                k=int(outcome.k),
            ),
        )
