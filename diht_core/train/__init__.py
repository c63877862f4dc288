"""Training: the loop, its data, optimiser and schedule, checkpoints, losses and the distributed plumbing."""

from .data import StreamingData, TrainSet, batch_indices, load_train_set
from .loop import train
from .optim import cosine_lr

__all__ = ["StreamingData", "TrainSet", "batch_indices", "cosine_lr", "load_train_set", "train"]
