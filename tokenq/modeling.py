"""`TokenQModel`: a Hugging Face causal LM (the behaviour policy pi_beta) + V/Q heads on its hidden states.

One backbone forward yields the LM logits and the features the heads read, so neither training nor guided
decoding runs the backbone twice: within `reading_features()` a hook hands the hidden state of the configured
layer to a `FeatureTap` local to that block (the input of the output embedding for `head_layer = -1`, the final
normalised hidden state the LM head sees, or the output of decoder block `k` for `head_layer = k`). Nothing
is left on a module: outside the block no hook runs, and two models never read each other's features.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig
from trl import ModelConfig

from tokenq.backbone import load_backbone
from tokenq.checkpoint import CheckpointMixin, base_model_of
from tokenq.distributional import bernoulli_q_eta, categorical_value, check_eta, return_atoms
from tokenq.generation import generate as guided_generate
from tokenq.heads import IQLHeads, LowRankQHead, StackedLowRankQ, TokenQConfig
from tokenq.mdp import action_positions

logger = logging.getLogger(__name__)


class TokenQOutput(NamedTuple):
    """Training outputs at the N action positions of a batch (row-major order of `action_mask`)."""

    values: torch.Tensor  # (B, T) V(s_t) at every position (needed at next states too)
    q_lse_t: torch.Tensor | None  # (K, N) logsumexp over the vocabulary of online Q at action positions
    q_t: torch.Tensor | None  # (K, N) online Q at the taken actions
    target_q_t: torch.Tensor | None  # (K, N) target Q at the taken actions, no gradient
    logits_t: torch.Tensor | None  # (N, V) LM logits at action positions (None unless asked for)
    a_t: torch.Tensor  # (N,) taken actions


class FeatureTap:
    """The features of the backbone forwards run within one `TokenQModel.reading_features()` block: `pop()` hands back
    (and drops) those of the last forward; `rows` counts the batch rows of every forward seen (compute accounting)."""

    def __init__(self) -> None:
        self._h: torch.Tensor | None = None
        self.rows = 0

    def store(self, h: torch.Tensor) -> None:
        self._h = h
        self.rows += h.shape[0]

    def pop(self) -> torch.Tensor:
        """The hidden states (B, T, H) of the heads' layer from the last backbone forward, in fp32."""
        if self._h is None:
            raise RuntimeError("no features: run a backbone forward inside the reading_features() block first")
        h, self._h = self._h, None
        return h.float()


@contextlib.contextmanager
def logits_at(backbone: nn.Module, positions: torch.Tensor | None):
    """Within the block, a forward of `backbone` computes LM logits only at `positions` ((B, T) bool) and
    returns them as (1, N, V), in the row-major order of `positions`; `None`: at no position ((B, 0, V)).

    A forward pre-hook on the output embedding hands it `h[positions]` instead of the (B, T, H) hidden
    states, so the model's own forward still runs whatever it does to the LM head's output (Gemma's
    soft-capping, Cohere's and Granite's logit scaling are element-wise). transformers' `logits_to_keep`
    does not do this: it keeps the same positions in every row, and training rows act at different ones.
    The feature tap's hook runs before it (`prepend=True`), so the heads still see every position."""

    def select(module: nn.Module, args):
        h = args[0]
        if positions is None:
            return (h[:, :0], *args[1:])
        if h.shape[:2] != positions.shape:
            raise ValueError(f"logits_at: hidden states {tuple(h.shape[:2])} do not match positions {tuple(positions.shape)}")
        return (h[positions].unsqueeze(0), *args[1:])

    handle = backbone.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def _base_checkpointing(backbone: nn.Module, action: str):
    """The base model's `activation_checkpointing_<action>` (transformers' name since 5.x), or the older
    `gradient_checkpointing_<action>` on releases without it."""
    base = base_model_of(backbone)
    return getattr(base, f"activation_checkpointing_{action}", None) or getattr(base, f"gradient_checkpointing_{action}")


def _decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    n_layers = backbone.config.get_text_config().num_hidden_layers
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the {n_layers} decoder layers of {type(backbone).__name__}")


class TokenQModel(
    nn.Module,
    CheckpointMixin,
    library_name="tokenq",
    tags=["tokenq", "value-head", "q-guided-decoding"],
    license="apache-2.0",
    pipeline_tag="text-generation",
    docs_url="https://github.com/tokenq/tokenq",
):
    """Backbone (`PreTrainedModel` or `PeftModel`) + `IQLHeads`. Build with `tokenq.build_model(ModelConfig(...))`,
    `TokenQModel(backbone, TokenQConfig())` or `TokenQModel.from_pretrained(dir_or_hub_id)`; save with
    `save_pretrained(dir, tokenizer=...)`, share with `push_to_hub(repo_id, tokenizer=...)` (`CheckpointMixin`)."""

    def __init__(self, backbone: nn.Module, tokenq_config: TokenQConfig | None = None, heads: IQLHeads | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenq_config = config = tokenq_config or TokenQConfig()
        text_config = backbone.config.get_text_config()
        unembed = backbone.get_output_embeddings().weight
        self.heads = heads or IQLHeads.from_config(config, text_config.hidden_size, unembed.shape[0], unembed).to(unembed.device)
        if config.head_layer == -1:
            feature_module = backbone.get_output_embeddings()
        elif 1 <= config.head_layer <= text_config.num_hidden_layers:
            feature_module = _decoder_layers(backbone)[config.head_layer - 1]
        else:
            raise ValueError(f"head_layer must be -1 or in [1, {text_config.num_hidden_layers}], got {config.head_layer}")
        # A plain attribute, not a registered child: the module already lives inside the backbone, and
        # registering it again would put its weights in the state dict twice.
        self.__dict__["_feature_module"] = feature_module
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)

    # ---- what the HF stack expects of a model -----------------------------------------------------
    @property
    def config(self) -> PretrainedConfig:
        """The backbone's (base model's) config: what Trainer, accelerate and model cards read."""
        return base_model_of(self.backbone).config

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's decoder layer classes: what FSDP's transformer auto-wrap shards one by one."""
        return list(getattr(base_model_of(self.backbone), "_no_split_modules", None) or [])

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return base_model_of(self.backbone).supports_gradient_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute the backbone's decoder layers in backward (HF's activation checkpointing on the base model;
        for LoRA / 4-bit backbones it also makes the embeddings' output require grad, so gradients reach the
        adapters). A frozen backbone runs without gradient: nothing to checkpoint, so it stays as is."""
        if not self.backbone_trainable:
            logger.info("activation checkpointing skipped: the backbone is frozen (its forward keeps no activations)")
            return
        _base_checkpointing(self.backbone, "enable")(activation_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        _base_checkpointing(self.backbone, "disable")()

    @property
    def is_activation_checkpointing(self) -> bool:
        base = base_model_of(self.backbone)
        return getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Alias of `activation_checkpointing_enable` (transformers' older name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """`tokenq.generate` on this model: `strategy` (sample / greedy / beam / best_of_n / resample /
        step_search), `beta`, and HF generation arguments. Returns `GuidedOutput`."""
        return guided_generate(self, input_ids, attention_mask, **kwargs)

    def train(self, mode: bool = True) -> TokenQModel:
        """A frozen backbone stays in eval mode: no dropout on the features the heads learn from (decoding
        reads them without dropout), and no wasted dropout work in the no-grad forward."""
        super().train(mode)
        if not self.backbone_trainable:
            self.backbone.eval()
        return self

    # ---- features --------------------------------------------------------------------------------
    @property
    def unembed(self) -> torch.Tensor:
        """The backbone's output embedding W_U (V, H); the low-rank Q head reads it detached."""
        return self.backbone.get_output_embeddings().weight

    @contextlib.contextmanager
    def reading_features(self):
        """Within the block, every backbone forward hands the features the heads read to the yielded `FeatureTap`
        (`tap.pop()` after each forward). The hook exists only inside the block and writes only to its own tap."""
        tap = FeatureTap()
        if self.tokenq_config.head_layer == -1:  # the LM head's input; before any other pre-hook (`logits_at`)
            handle = self._feature_module.register_forward_pre_hook(lambda module, args: tap.store(args[0]), prepend=True)
        else:
            handle = self._feature_module.register_forward_hook(
                lambda module, args, output: tap.store(output[0] if isinstance(output, tuple) else output))
        try:
            yield tap
        finally:
            handle.remove()

    @property
    def backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    # ---- training forward ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor,
                heads: str = "iql", lm_logits: bool = True, q_logsumexp: bool = True) -> TokenQOutput:
        """One backbone forward; heads only where needed. Inputs (B, T), right-padded. LM logits are
        computed at the N action positions only (`logits_at`), or nowhere for `lm_logits=False` (a frozen
        LM's loss terms are constants). `heads`:
        "iql": V everywhere, online Q and target Q at the taken actions, and (unless `q_logsumexp=False`:
        no CQL term) online Q's logsumexp over the vocabulary (chunked: no (K, N, V) tensor);
        "probe": V everywhere and online Q at the taken actions only (Monte-Carlo regression, Q-probes);
        "value": V everywhere, no Q (DQO's critic on the policy's own trunk)."""
        if heads not in ("iql", "probe", "value"):
            raise ValueError(f"heads must be iql / probe / value, got {heads!r}")
        grad = contextlib.nullcontext() if self.backbone_trainable else torch.no_grad()
        acting = action_positions(action_mask)
        with grad, self.reading_features() as tap, logits_at(self.backbone, acting if lm_logits else None):
            logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        h = tap.pop()
        h_t, a_t = h[acting], input_ids.roll(-1, dims=1)[acting]
        q_lse_t = q_t = target_q_t = None
        if heads == "iql":
            q_t, q_lse_t = self.heads.online_q(h_t, self.unembed, a_t.unsqueeze(-1), logsumexp=q_logsumexp)
            q_t = q_t.squeeze(-1)  # q_lse_t: CQL's logsumexp, chunked over the vocabulary
            with torch.no_grad():
                target_q_t = self.heads.q_values(h_t, self.unembed, a_t.unsqueeze(-1), target=True).squeeze(-1)
        elif heads == "probe":
            q_t = self.heads.q_values(h_t, self.unembed, a_t.unsqueeze(-1)).squeeze(-1)
        values = self.heads.v(h)
        return TokenQOutput(values=values, q_lse_t=q_lse_t, q_t=q_t, target_q_t=target_q_t,
                           logits_t=logits[0] if lm_logits else None, a_t=a_t)

    # ---- decoding ----------------------------------------------------------------------------------
    def _link(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) if self.tokenq_config.value_link == "sigmoid" else x

    @property
    def return_atoms(self) -> torch.Tensor | None:
        """The atoms (K,) of a categorical return distribution (`return_bins` K), None for scalar heads."""
        c = self.tokenq_config
        return return_atoms(c.return_bins, c.return_min, c.return_max, self.unembed.device) if c.return_bins else None

    def _read(self, eta: float | None):
        """How decoding reads raw scalar head outputs: the link (`value_link`), or with `eta` Q♯'s `Q_eta` of the
        Bernoulli return distribution of heads trained with BCE on 0/1 returns."""
        if eta is None:
            return self._link
        check_eta(eta)
        if self.tokenq_config.value_link != "sigmoid":
            raise ValueError("eta= needs a distributional critic: heads trained on 0/1 returns with value_loss 'bce', or "
                             f"with --return_bins and value_loss 'categorical' (this critic's value_link is "
                             f"{self.tokenq_config.value_link!r}, return_bins 0)")
        return lambda x: bernoulli_q_eta(x, eta)

    def _readers(self, eta: float | None):
        """(read_q, read_v): raw head outputs as values — stacked Q outputs (K, ...) -> (...) (min_i over twin heads,
        or the categorical over the atoms: one head per atom), V outputs -> (...) — read as E[Z] / the link, or as
        `Q_eta` with `eta`. The atoms are made once per call, not per decoding step."""
        atoms = self.return_atoms
        if atoms is None:
            read = self._read(eta)
            return (lambda stacked: read(stacked.min(dim=0).values)), read
        if eta is not None:
            check_eta(eta)
        return (lambda stacked: categorical_value(stacked.movedim(0, -1), atoms, eta)), (lambda v: categorical_value(v, atoms, eta))

    @torch.no_grad()
    def candidate_values(self, h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """min_i Qbar_i(s, a) with the target Q heads (as ILQL decodes; E[Z] of a categorical critic): h (B, H)
        features of the current states; index (B, k) candidate tokens, or None for the whole vocabulary. Returns
        (B, k) or (B, V)."""
        read_q, _ = self._readers(None)
        return read_q(self.heads.q_values(h, self.unembed, index, target=True))

    def decoding_q(self, eta: float | None = None):
        """`candidate_values` for one decoding call (`Q_eta` with `eta`): low-rank target heads are fused into a
        snapshot (`StackedLowRankQ`), valid while the weights do not change. Returns `q(h, index=None)`."""
        read_q, read = self._readers(eta)  # checks eta against this critic before any decoding
        scalar = not self.tokenq_config.return_bins
        if scalar and all(isinstance(q, LowRankQHead) and len(q.g) == 3 for q in self.heads.target_q):
            fused = StackedLowRankQ(list(self.heads.target_q)).min_q
            return lambda h, index=None: read(fused(h, index))  # every reading is increasing: min first
        return lambda h, index=None: read_q(self.heads.q_values(h, self.unembed, index, target=True))

    def decoding_v(self, eta: float | None = None):
        """V(s) as decoding reads it (`V_eta` with `eta`): `v(h)`, h (..., H) -> (...)."""
        _, read_v = self._readers(eta)
        return lambda h: read_v(self.heads.v(h))

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The features (B, T, H) the heads read, from one backbone forward without LM logits (a frozen critic's
        view of a batch: `state_value(h)`, `candidate_values(h, index)`)."""
        with self.reading_features() as tap, logits_at(self.backbone, None):
            self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return tap.pop()

    @torch.no_grad()
    def value_estimates(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V and Q as decoding reads them, on a right-padded batch (B, T): V(s_t) at every position (B, T) and
        min_i Qbar_i(s_t, a_t) at the N action positions (N,), row-major. One backbone forward, no LM logits."""
        h = self.features(input_ids, attention_mask)
        acting = action_positions(action_mask)
        return self.state_value(h), self.action_value(h[acting], input_ids.roll(-1, dims=1)[acting])

    @torch.no_grad()
    def action_value(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """min_i Qbar_i(s, a) for one token per row: h (B, H), a (B,) -> (B,)."""
        return self.candidate_values(h, a.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def state_value(self, h: torch.Tensor) -> torch.Tensor:
        """V(s) (E[Z] of a categorical critic): h (..., H) -> (...)."""
        _, read_v = self._readers(None)
        return read_v(self.heads.v(h))

    def update_targets(self, alpha: float) -> None:
        self.heads.update_targets(alpha)


def build_model(
    model_args: ModelConfig,
    head_config: TokenQConfig | None = None,
    config: PretrainedConfig | None = None,
    gradient_checkpointing: bool = False,
) -> TokenQModel:
    """Backbone (`tokenq.backbone.load_backbone`: a Hub id / folder, or a fresh model from `config`; LoRA,
    4-bit) + fresh heads. A quantized backbone without LoRA is frozen."""
    head_config = head_config or TokenQConfig()
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and not model_args.use_peft and not head_config.freeze_backbone:
        logger.warning("a quantized backbone cannot be trained without --use_peft: freezing it (heads only)")
        head_config.freeze_backbone = True
    if model_args.use_peft and head_config.freeze_backbone:
        raise ValueError("--use_peft and --freeze_backbone exclude each other: pick LoRA or a frozen backbone")
    backbone = load_backbone(model_args, config, gradient_checkpointing)
    return TokenQModel(backbone, head_config)
