"""Training: the trainer loop, the backbone engines, optimisation and reshardable checkpoints."""
from sf2dist.train.trainer import BadStepsError, Trainer

__all__ = ["BadStepsError", "Trainer"]
