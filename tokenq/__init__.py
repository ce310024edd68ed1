"""tokenq: token-level value functions for Hugging Face causal LMs, and Q-guided decoding."""

from tokenq.backbone import load_backbone
from tokenq.data import DataArguments, EvalArguments, load_tokenizer
from tokenq.critic import CriticArguments
from tokenq.diagnostics import value_diagnostics
from tokenq.distributional import bernoulli_q_eta, categorical_value, two_hot
from tokenq.evaluation import GuidedEval, evaluate_betas, sweep
from tokenq.generation import STRATEGIES, GuidedOutput, generate, guided_sample
from tokenq.guidance import Guide, GuidanceProcessor, behaviour_filter
from tokenq.heads import IQLHeads, LowRankQHead, MLPQHead, UnembedQHead, ValueHead
from tokenq.implicit import (
    ImplicitQGuidance,
    implicit_q_generate,
    implicit_token_rewards,
    token_log_probs,
    with_implicit_rewards,
)
from tokenq.losses import (
    action_logprob, awac_loss, awr_loss, categorical_value_loss, best_of_n_loss, best_of_n_targets, cql_loss, dqo_policy_loss, expectile_loss, iql_loss, linear_logsumexp, masked_mean, mc_value_loss, td_loss,
)
from tokenq.extraction import extract, preference_pairs, save_policy, search_nodes
from tokenq.loop import LoopArguments
from tokenq.mdp import TokenCollator, normalize_rewards, tokenize_dataset
from tokenq.modeling import FeatureTap, TokenQConfig, TokenQModel, TokenQOutput, build_model
from tokenq.rollouts import collect, load_critic, load_policy, rollin_rows
from tokenq.returns import discounted_returns, lambda_returns, next_state, td_target
from tokenq.sft import behaviour_cloning
from tokenq.steering import Steering, check_same_vocabulary
from tokenq.tree import Node, astar, mcts
from tokenq.tune import TuneArguments, search_space
from tokenq.verdict import verdict
from tokenq.votes import AGGREGATES, VOTES, aggregate_steps, vote
from tokenq.tasks import Arithmetic, DatasetTask, RandomWalks, RewardFunction, Task, get_task, load_reward_fn
from tokenq.trainers import (
    AWRTrainer, BestOfNTrainer, DQOConfig, DQOTrainer, ExtractionArguments, IQLConfig, IQLTrainer, TargetUpdateCallback, TokenQTrainer, TokenQTrainingArguments, ValueConfig,
    ValueTrainer,
)

__version__ = "0.1.0"

__all__ = [
    "AGGREGATES",
    "AWRTrainer",
    "Node",
    "VOTES",
    "aggregate_steps",
    "astar",
    "mcts",
    "vote",
    "Arithmetic",
    "BestOfNTrainer",
    "CriticArguments",
    "FeatureTap",
    "Steering",
    "ExtractionArguments",
    "LoopArguments",
    "Guide",
    "GuidanceProcessor",
    "GuidedOutput",
    "STRATEGIES",
    "DQOConfig",
    "DQOTrainer",
    "DataArguments",
    "DatasetTask",
    "EvalArguments",
    "GuidedEval",
    "IQLConfig",
    "ImplicitQGuidance",
    "IQLHeads",
    "IQLTrainer",
    "LowRankQHead",
    "MLPQHead",
    "RandomWalks",
    "RewardFunction",
    "TargetUpdateCallback",
    "Task",
    "TokenCollator",
    "TokenQConfig",
    "TokenQModel",
    "TokenQOutput",
    "TokenQTrainer",
    "TokenQTrainingArguments",
    "UnembedQHead",
    "ValueConfig",
    "ValueHead",
    "ValueTrainer",
    "action_logprob",
    "awac_loss",
    "awr_loss",
    "best_of_n_loss",
    "best_of_n_targets",
    "bernoulli_q_eta",
    "categorical_value",
    "categorical_value_loss",
    "check_same_vocabulary",
    "load_critic",
    "rollin_rows",
    "two_hot",
    "collect",
    "extract",
    "load_policy",
    "preference_pairs",
    "save_policy",
    "search_nodes",
    "behaviour_cloning",
    "behaviour_filter",
    "build_model",
    "cql_loss",
    "discounted_returns",
    "dqo_policy_loss",
    "evaluate_betas",
    "expectile_loss",
    "generate",
    "get_task",
    "guided_sample",
    "implicit_q_generate",
    "implicit_token_rewards",
    "iql_loss",
    "lambda_returns",
    "linear_logsumexp",
    "load_reward_fn",
    "load_backbone",
    "load_tokenizer",
    "masked_mean",
    "mc_value_loss",
    "next_state",
    "normalize_rewards",
    "td_loss",
    "sweep",
    "td_target",
    "token_log_probs",
    "tokenize_dataset",
    "value_diagnostics",
    "verdict",
    "search_space",
    "TuneArguments",
    "with_implicit_rewards",
]
