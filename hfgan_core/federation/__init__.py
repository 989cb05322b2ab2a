"""Federation: activation summaries, KMeans clustering, KLD scores, aggregation weights and weighted averaging.

Pure functions (no transport, no state store), shared by the clustering service, the aggregators and replay.
"""

from .aggregate import (
    StateLayout,
    aggregate_round,
    average_members,
    client_layers,
    held_blocks,
    member_full_state,
    server_blocks,
    server_layers,
    state_digest,
    weighted_average,
)
from .clustering import ClusterOutcome, cluster_clients
from .kld import kld_by_group, kld_scores
from .kmeans import DEFAULT_MIN_SILHOUETTE, KMeansResult, choose_k, kmeans, silhouette_score
from .summary import activation_summary
from .weights import Weights, aggregation_weights

__all__ = [
    "DEFAULT_MIN_SILHOUETTE",
    "ClusterOutcome",
    "KMeansResult",
    "StateLayout",
    "Weights",
    "activation_summary",
    "aggregate_round",
    "aggregation_weights",
    "average_members",
    "choose_k",
    "client_layers",
    "cluster_clients",
    "held_blocks",
    "kld_by_group",
    "kld_scores",
    "kmeans",
    "member_full_state",
    "server_blocks",
    "server_layers",
    "silhouette_score",
    "state_digest",
    "weighted_average",
]
