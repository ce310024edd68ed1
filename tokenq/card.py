"""The model card (`README.md`) written with every tokenq checkpoint: huggingface_hub's `ModelCard`
from a Jinja template, with YAML metadata the Hub indexes (`library_name: tokenq`, `base_model`, `tags`,
`datasets`, `license`, `pipeline_tag`), what the heads are, a snippet that loads the checkpoint and runs
guided generation, the training configuration and the results a recipe measured."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

TAGS = ["tokenq", "value-head", "q-guided-decoding", "token-level-mdp"]

Q_HEADS = {
    "low_rank": "low-rank Q head `Q(s,a) = <E[a], g(h_s)> + b_a` (learned rank-{rank} token embedding E)",
    "unembed": "Q head on the backbone's unembedding `Q(s,a) = <W_U[a], g(h_s)> + b_a`",
    "mlp": "trlx-style MLP Q head (H -> 2H -> vocabulary)",
}

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A [tokenq]({{ docs_url }}) checkpoint: a causal LM ({{ backbone }}) with token-level value heads
{%- if objective %} trained with {{ objective }}{% endif %}. The heads steer decoding: guided sampling
draws from `pi_beta(a|s) exp(beta (Q(s,a) - V(s)))` with one backbone forward per token, and
greedy / beam / best-of-N / step search rank by the same values.

## Heads

| | |
|---|---|
{% for key, value in heads.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
## Use

```python
from transformers import AutoTokenizer
from tokenq import TokenQModel

model = TokenQModel.from_pretrained("{{ repo_id }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}", padding_side="left")
inputs = tokenizer(["{{ example_prompt }}"], return_tensors="pt")
out = model.generate(**inputs, strategy="sample", beta=4.0, top_k=10, max_new_tokens=32)
print(tokenizer.batch_decode(out.sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True))
```

`pip install tokenq` loads it (no `trust_remote_code`). `AutoModelForCausalLM.from_pretrained` on this
repo loads the backbone (the behaviour policy) without the heads.
{% if training %}
## Training

| setting | value |
|---|---|
{% for key, value in training.items() -%}
| {{ key }} | {{ value }} |
{% endfor -%}
{% endif %}
{%- if results_table or metrics %}
## Results
{% if results_table %}
{{ results_table }}
{% endif %}
{%- if metrics %}
| metric | value |
|---|---:|
{% for key, value in metrics.items() -%}
| {{ key }} | {{ value }} |
{% endfor -%}
{% endif %}
{%- for plot in plots %}
![{{ plot }}]({{ plot }})
{% endfor -%}
{% endif %}
"""


def _fmt(value) -> str:
    value = getattr(value, "value", value)  # enums (e.g. SchedulerType) by their value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_heads(record: dict) -> dict[str, str]:
    """The heads and backbone of a checkpoint record (`CheckpointMixin.checkpoint_record`) in words."""
    heads, backbone = record["heads"], record["backbone"]
    layer = heads["head_layer"]
    q = Q_HEADS[heads["q_head"]].format(rank=heads["q_rank"])
    quant = backbone.get("quantization") or {}
    mode = backbone["mode"] + (" (4-bit)" if quant.get("load_in_4bit") else "")
    return {
        "Q heads": f"{heads['num_q_heads']} x {q}, with Polyak-averaged targets (decoding reads min_i Qbar_i)",
        "V head": "V(s): MLP on the same features" + (" (sigmoid link: trained with BCE)" if heads["value_link"] == "sigmoid" else ""),
        "features": "final normalised hidden state" if layer == -1 else f"output of decoder block {layer}",
        "backbone": f"{', '.join(backbone['architectures'])} ({backbone['model_type']}), {mode}",
        "base model": backbone["base_model"] or "weights included in this repo",
        "hidden size / vocabulary": f"{record['hidden_size']} / {record['vocab_size']}",
    }


def build_model_card(record: dict, card_data: ModelCardData, *, docs_url: str | None = None, repo_url: str | None = None,
                     repo_id: str | None = None, model_name: str | None = None, objective: str | None = None,
                     training: dict | None = None, datasets: list[str] | None = None, results: dict | None = None,
                     license: str | None = None, tags: list[str] | None = None, example_prompt: str = "Hello") -> ModelCard:
    """A card for the checkpoint `record` describes (`CheckpointMixin.checkpoint_record`, the content of
    `tokenq_config.json`). `results`: `{"table": markdown, "metrics": {name: number}, "plots": [file names in
    the checkpoint folder]}` as a recipe measured them."""
    heads = describe_heads(record)
    base_model = record["backbone"]["base_model"]
    data = ModelCardData(**{**card_data.to_dict(), "library_name": "tokenq", "pipeline_tag": "text-generation"})
    data.tags = sorted(set(data.tags or []) - {"model_hub_mixin"} | set(TAGS) | set(tags or []))
    data.base_model = base_model if base_model and "/" in base_model and not base_model.startswith((".", "/")) else None
    data.datasets = datasets or None
    data.license = license or data.license
    results = results or {}
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        model_name=model_name or (repo_id.split("/")[-1] if repo_id else "tokenq model"),
        repo_id=repo_id or "path/to/checkpoint",
        docs_url=docs_url or repo_url or "https://github.com/tokenq/tokenq",
        backbone=heads["backbone"],
        objective=objective,
        heads=heads,
        training={k: _fmt(v) for k, v in (training or {}).items()},
        results_table=results.get("table"),
        metrics={k: _fmt(v) for k, v in (results.get("metrics") or {}).items()},
        plots=results.get("plots") or [],
        example_prompt=example_prompt.replace('"', '\\"'),
    )
