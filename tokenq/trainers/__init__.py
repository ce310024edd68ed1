"""Trainers: `IQLTrainer` (ILQL / IQL), `ValueTrainer` (Monte-Carlo values, Q-probes), `DQOTrainer` (DQO)."""

from tokenq.trainers.base import TargetUpdateCallback, TokenQTrainer, TokenQTrainingArguments, prepare_dataset
from tokenq.trainers.dqo import DQOConfig, DQOTrainer
from tokenq.trainers.iql import IQLConfig, IQLTrainer
from tokenq.trainers.value import ValueConfig, ValueTrainer

__all__ = [
    "DQOConfig", "DQOTrainer", "IQLConfig", "IQLTrainer", "TargetUpdateCallback", "TokenQTrainer",
    "TokenQTrainingArguments", "ValueConfig", "ValueTrainer", "prepare_dataset",
]
