"""Trainers: `IQLTrainer` (ILQL / IQL), `ValueTrainer` (Monte-Carlo values, Q-probes), `DQOTrainer` (DQO), and the
policy extraction trainers `AWRTrainer`, `BestOfNTrainer` (from a frozen critic)."""

from tokenq.trainers.base import TargetUpdateCallback, TokenQTrainer, TokenQTrainingArguments, prepare_dataset
from tokenq.trainers.dqo import DQOConfig, DQOTrainer
from tokenq.trainers.extract import AWRTrainer, BestOfNTrainer, ExtractionArguments
from tokenq.trainers.iql import IQLConfig, IQLTrainer
from tokenq.trainers.value import ValueConfig, ValueTrainer

__all__ = [
    "AWRTrainer", "BestOfNTrainer", "ExtractionArguments", "DQOConfig", "DQOTrainer", "IQLConfig", "IQLTrainer", "TargetUpdateCallback", "TokenQTrainer",
    "TokenQTrainingArguments", "ValueConfig", "ValueTrainer", "prepare_dataset",
]
