"""V and Q heads on a backbone's hidden states (fp32, evaluated only where asked), and `TokenQConfig`.

The default Q head (`q_head="low_rank"`, `LowRankQHead`) is a factorised ILQL head with a learned
rank-r token embedding E (V, r), initialised from the top-r principal directions of the LM's unembedding:

    Q(s, a) = <E[a], g(h_s)> + b_a,    g: H -> inner -> r (a two-layer MLP)

so its cost is O(H * inner + V * r) parameters instead of O(H * V) (V + two Q heads + two targets are
7.8% of GPT-2 small at a 50k vocabulary), and Q for a set of candidate tokens costs one gather of
their E rows. `UnembedQHead` uses the backbone's own detached unembedding W_U as E (no vocabulary-sized
parameters but b); `MLPQHead` is the trlx / ILQL head (H -> 2H -> V), kept as an option.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tokenq.losses import linear_logsumexp


@dataclass
class TokenQConfig:
    """How the heads sit on the backbone (saved as `tokenq_config.json` with every checkpoint)."""

    head_layer: int = field(
        default=-1,
        metadata={"help": "Hidden state the heads read: -1 = the final normalised state (the LM head's input); "
                  "k >= 1 = the output of decoder block k (an intermediate layer, as in Digi-Q)."},
    )
    q_head: str = field(
        default="low_rank",
        metadata={"help": "'low_rank': Q(s,a) = <E[a], g(h)> + b_a with a learned rank-r token embedding E "
                  "started from the LM's unembedding (small, default); 'unembed': E = the backbone's own W_U, "
                  "detached (smallest; for frozen / LoRA backbones); 'mlp': trlx's H -> 2H -> vocab MLP (large)."},
    )
    q_rank: int = field(default=32, metadata={"help": "Rank r of the low_rank Q head's token embedding."})
    head_inner_size: int | None = field(
        default=None,
        metadata={"help": "Width of the heads' hidden layer (default: H for low_rank, 2H for mlp; 0 = linear heads, probes)."}
    )
    num_q_heads: int = field(default=2, metadata={"help": "Q heads; targets use the min over them (2 = twin Q)."})
    value_link: str = field(
        default="identity",
        metadata={"help": "How decoding reads head outputs: 'identity', or 'sigmoid' for heads trained with a "
                  "binary cross-entropy on 0/1 returns (their outputs are logits of the success probability)."},
    )
    return_bins: int = field(
        default=0,
        metadata={"help": "0: scalar V / Q heads. K >= 2: the heads give a categorical distribution of the return over K "
                  "atoms evenly spaced on [return_min, return_max] (one Q head per atom; num_q_heads is not used); "
                  "trained by tokenq value --value_loss categorical, read as E[Z] or, with eta, Q♯'s Q_eta."},
    )
    return_min: float = field(default=0.0, metadata={"help": "The lowest atom of --return_bins."})
    return_max: float = field(default=1.0, metadata={"help": "The highest atom of --return_bins."})
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "Train the heads only; the base LM stays the behaviour policy pi_beta (Q-probe / ILQL "
                  "with a fixed pi_beta). Implied for a 4-bit backbone without --use_peft."},
    )

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(d_in: int, d_hidden: int, d_out: int, out_std: float) -> nn.Sequential:
    """Two layers with a ReLU, or one linear layer (a linear probe) for `d_hidden = 0`."""
    layers = [nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out)] if d_hidden else [nn.Linear(d_in, d_out)]
    net = nn.Sequential(*layers)
    nn.init.normal_(net[-1].weight, std=out_std)
    nn.init.zeros_(net[-1].bias)
    return net


class ValueHead(nn.Module):
    """V(s): H -> inner -> 1, or -> K logits of a categorical return distribution (`outputs = K`)."""

    def __init__(self, hidden_size: int, inner_size: int, outputs: int = 1) -> None:
        super().__init__()
        self.net = _mlp(hidden_size, inner_size, outputs, out_std=1e-3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) -> V (...), or (..., K) logits."""
        v = self.net(h.float())
        return v.squeeze(-1) if v.shape[-1] == 1 else v


class LinearQHead(nn.Module, abc.ABC):
    """A Q head of the form `Q(s, .) = x(h_s) @ W.T + b` over the vocabulary (every head here is one):
    subclasses give `linear_form(h, unembed) -> (x (N, D), W (V, D), b (V,))`. Q on candidate tokens then
    costs a gather of their W rows, and the logsumexp over the vocabulary (CQL) a chunked pass over W
    (`linear_logsumexp`): never an (N, V) tensor."""

    @abc.abstractmethod
    def linear_form(self, h: torch.Tensor, unembed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(x, W, b)` of this head's Q at the states `h` (N, H)."""

    def forward(self, h: torch.Tensor, unembed: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """h (N, H); index (N, k) token ids or None. Returns (N, k), or (N, V) for None."""
        return q_at(*self.linear_form(h, unembed), index)


def q_at(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """`(x @ weight.T + bias)` at the token ids `index` (N, k), from their rows of `weight` only; all (N, V) for None."""
    if index is None:
        return x @ weight.T + bias
    return torch.einsum("nd,nkd->nk", x, weight[index]) + bias[index]


class LowRankQHead(LinearQHead):
    """Q(s, a) = <E[a], g(h_s)> + b_a with a learned rank-r token embedding E (V, r), g: H -> inner -> r.

    A factorised version of the ILQL MLP head (H -> inner -> r -> V). E starts from the top-r principal
    directions of the LM's unembedding, so tokens the LM treats alike start with similar Q directions,
    and it is trained (and Polyak-averaged) with the head: tying Q to the live unembedding lets Q drift
    whenever the LM head is trained, and couples unseen tokens to seen ones (see `UnembedQHead`).
    """

    def __init__(self, hidden_size: int, inner_size: int, vocab_size: int, rank: int = 32, unembed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.g = _mlp(hidden_size, inner_size, rank, out_std=1e-3)
        self.embedding = nn.Parameter(_principal_rows(unembed, rank) if unembed is not None else torch.randn(vocab_size, rank))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def linear_form(self, h: torch.Tensor, unembed: torch.Tensor):
        return self.g(h.float()), self.embedding, self.bias


class StackedLowRankQ:
    """Decoding view of several `LowRankQHead`s: their small MLPs g are stacked so that `min_i Q_i` on
    candidate tokens takes a handful of batched ops instead of a dozen small ones per head (per-op
    overhead dominates a decoding step on CPU). Token embeddings are read in place, never copied.
    Valid while the heads' weights do not change (one decoding call)."""

    def __init__(self, heads: list[LowRankQHead]) -> None:
        with torch.no_grad():
            self.w1 = torch.stack([q.g[0].weight.T for q in heads])  # (K, H, inner)
            self.b1 = torch.stack([q.g[0].bias for q in heads]).unsqueeze(1)  # (K, 1, inner)
            self.w2 = torch.stack([q.g[2].weight.T for q in heads])  # (K, inner, r)
            self.b2 = torch.stack([q.g[2].bias for q in heads]).unsqueeze(1)  # (K, 1, r)
        self.embeddings = [q.embedding.detach() for q in heads]  # (V, r) each
        self.biases = [q.bias.detach() for q in heads]  # (V,) each

    @torch.no_grad()
    def min_q(self, h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, H), index (B, k) or None -> min over heads of Q: (B, k) or (B, V)."""
        h = h.float().unsqueeze(0).expand(self.w1.shape[0], -1, -1)
        z = torch.baddbmm(self.b2, torch.relu(torch.baddbmm(self.b1, h, self.w1)), self.w2)  # (K, B, r)
        q = None
        for z_i, emb, bias in zip(z, self.embeddings, self.biases):
            if index is None:
                q_i = torch.addmm(bias, z_i, emb.T)
            else:
                flat = index.flatten()
                q_i = (emb.index_select(0, flat).view(*index.shape, -1) @ z_i.unsqueeze(-1)).squeeze(-1)
                q_i = q_i + bias.index_select(0, flat).view(index.shape)
            q = q_i if q is None else torch.minimum(q, q_i)
        return q


@torch.no_grad()
def _principal_rows(unembed: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows of W_U projected on its top-`rank` principal directions, scaled to unit RMS per column.
    Falls back to random columns past W_U's own rank (tiny vocabularies)."""
    w = unembed.detach().float()
    w = w - w.mean(0)
    q = min(rank, *w.shape)
    u, s, _ = torch.svd_lowrank(w, q=q, niter=4)
    rows = u * s
    if q < rank:
        rows = torch.cat([rows, torch.randn(w.shape[0], rank - q, device=w.device)], dim=1)
    return (rows / rows.pow(2).mean(0, keepdim=True).sqrt().clamp(min=1e-8)).cpu()


class UnembedQHead(LinearQHead):
    """Q(s, a) = <W_U[a], g(h_s)> + b_a on the backbone's (detached) unembedding W_U: no vocabulary-sized
    parameters beyond b. Suited to frozen / LoRA backbones whose W_U does not move during training."""

    def __init__(self, hidden_size: int, inner_size: int, vocab_size: int, rank: int = 0, unembed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.g = _mlp(hidden_size, inner_size, hidden_size, out_std=1e-3)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def linear_form(self, h: torch.Tensor, unembed: torch.Tensor):
        return self.g(h.float()), unembed.detach().float(), self.bias


class MLPQHead(LinearQHead):
    """The trlx / ILQL Q head: H -> 2H -> V (Snell et al. 2022). `unembed` is ignored. Its linear form is the
    output layer on the hidden layer's activations: Q on candidates uses only their rows of the output
    layer, O(N k 2H) instead of the (N, V) output."""

    def __init__(self, hidden_size: int, inner_size: int, vocab_size: int, rank: int = 0, unembed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.net = _mlp(hidden_size, inner_size, vocab_size, out_std=1e-3)

    def linear_form(self, h: torch.Tensor, unembed: torch.Tensor):
        out = self.net[-1]
        return self.net[:-1](h.float()), out.weight, out.bias


Q_HEADS = {"low_rank": LowRankQHead, "unembed": UnembedQHead, "mlp": MLPQHead}


class IQLHeads(nn.Module):
    """One V head, `num_q` Q heads and their Polyak-averaged target copies (no gradient)."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        q_head: str = "low_rank",
        inner_size: int | None = None,
        num_q: int = 2,
        rank: int = 32,
        unembed: torch.Tensor | None = None,
        v_outputs: int = 1,
    ) -> None:
        super().__init__()
        if q_head not in Q_HEADS:
            raise ValueError(f"q_head must be one of {sorted(Q_HEADS)}, got {q_head!r}")
        inner = (2 * hidden_size if q_head == "mlp" else hidden_size) if inner_size is None else inner_size
        self.v = ValueHead(hidden_size, inner, v_outputs)
        self.q = nn.ModuleList(Q_HEADS[q_head](hidden_size, inner, vocab_size, rank, unembed) for _ in range(num_q))
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)

    @classmethod
    def from_config(cls, config: TokenQConfig, hidden_size: int, vocab_size: int,
                    unembed: torch.Tensor | None = None) -> IQLHeads:
        """The heads `config` describes, for a backbone of this width and vocabulary (with `return_bins` K: a V head
        of K logits and one Q head per atom)."""
        if config.return_bins == 1 or config.return_bins < 0 or (config.return_bins and config.return_max <= config.return_min):
            raise ValueError(f"return_bins must be 0 or >= 2 with return_min < return_max, got {config.return_bins} on "
                             f"[{config.return_min}, {config.return_max}]")
        bins = config.return_bins
        return cls(hidden_size, vocab_size, config.q_head, config.head_inner_size, bins or config.num_q_heads,
                   config.q_rank, unembed, v_outputs=bins or 1)

    @torch.no_grad()
    def update_targets(self, alpha: float) -> None:
        """Polyak averaging `theta_bar <- alpha * theta + (1 - alpha) * theta_bar` (alpha = 1: hard copy).

        Elementwise, so it is right on shards whenever a head and its target are sharded alike, with no
        gather: FSDP2 shards both the same way (same shapes, same mesh: the DTensor `lerp_` is local), and
        DeepSpeed ZeRO-3 partitions equal-shaped parameters alike, this process's partition being
        `ds_tensor` (the full `p.data` is empty outside a gather)."""
        for p, p_bar in zip(self.q.parameters(), self.target_q.parameters(), strict=True):
            if hasattr(p, "ds_tensor"):
                p_bar.ds_tensor.lerp_(p.ds_tensor, alpha)
            else:
                p_bar.lerp_(p.detach(), alpha)

    def online_q(self, h: torch.Tensor, unembed: torch.Tensor, index: torch.Tensor,
                 logsumexp: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`q_values(h, unembed, index)` (K, N, k) and, for `logsumexp`, each online head's logsumexp over the
        vocabulary (K, N), chunked (CQL's term: never (K, N, V)); each head's features are computed once for both."""
        q, lse = [], []
        for head in self.q:
            form = head.linear_form(h, unembed)
            q.append(q_at(*form, index))
            if logsumexp:
                lse.append(linear_logsumexp(*form))
        return torch.stack(q), torch.stack(lse) if logsumexp else None

    def q_values(self, h: torch.Tensor, unembed: torch.Tensor, index: torch.Tensor | None = None, target: bool = False) -> torch.Tensor:
        """Stacked Q of every online (or target) head: (K, N, k) or (K, N, V)."""
        heads = self.target_q if target else self.q
        return torch.stack([head(h, unembed, index) for head in heads])
