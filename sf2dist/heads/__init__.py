"""Classifiers sharded by identity across ranks: SphereFace2 and the softmax baseline."""
from sf2dist.heads.base import ShardedHead, init_class_rows
from sf2dist.heads.partial_fc import LambdaSchedule, PartialFCHead, sphereface_psi
from sf2dist.heads.sparse_sgd import FusedStepSGD, SampledRowsSGD, make_head_sgd, sgd_rows_
from sf2dist.heads.sphereface2 import SphereFace2Head, initial_bias

__all__ = [
    "ShardedHead", "SphereFace2Head", "PartialFCHead", "LambdaSchedule", "sphereface_psi", "initial_bias",
    "init_class_rows", "SampledRowsSGD", "FusedStepSGD", "make_head_sgd", "sgd_rows_",
]
