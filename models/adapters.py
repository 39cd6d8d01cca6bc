"""Architecture adapters: where each layer's heads, q/k/v/o projections and FFN live.

One registry keyed by family. Pruning, weight sharing and head-parallel partitioning reach the
model only through an adapter, so adding an architecture means adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from edgec.errors import SourceError


@dataclass
class LayerParts:
    """One transformer block's prunable parts.

    ``query``/``key``/``value`` map hidden -> heads * head_dim; ``attn_out`` maps back.
    ``ffn_in`` maps hidden -> intermediate; ``ffn_out`` maps back. ``attention`` is the module
    whose head count must be updated when heads are removed (``heads_attr`` names the field).
    """

    block: nn.Module
    attention: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    num_heads: int
    head_dim: int
    heads_attr: str


@dataclass(frozen=True)
class Adapter:
    """How to find a family's transformer blocks and their parts."""

    family: str
    model_types: tuple[str, ...]
    layers: Callable[[nn.Module], list[LayerParts]]
    embeddings: Callable[[nn.Module], list[nn.Embedding]]


def _base(model: nn.Module, attr: str) -> Any:
    """The base model inside a task head wrapper (``BertForSequenceClassification.bert``)."""
    prefix = getattr(model, "base_model_prefix", "")
    return (
        getattr(model, prefix)
        if prefix and hasattr(model, prefix) and not hasattr(model, attr)
        else model
    )


def _heads(module: nn.Module, attr: str, width: int) -> tuple[int, int]:
    heads = int(getattr(module, attr))
    return heads, width // heads if heads else 0


def _bert_layers(model: nn.Module) -> list[LayerParts]:
    parts = []
    for block in _base(model, "encoder").encoder.layer:
        attn = block.attention.self
        heads, head_dim = _heads(attn, "num_attention_heads", attn.query.out_features)
        parts.append(
            LayerParts(
                block=block,
                attention=attn,
                query=attn.query,
                key=attn.key,
                value=attn.value,
                attn_out=block.attention.output.dense,
                ffn_in=block.intermediate.dense,
                ffn_out=block.output.dense,
                num_heads=heads,
                head_dim=head_dim,
                heads_attr="num_attention_heads",
            )
        )
    return parts


def _distilbert_layers(model: nn.Module) -> list[LayerParts]:
    parts = []
    for block in _base(model, "transformer").transformer.layer:
        attn = block.attention
        heads, head_dim = _heads(attn, "n_heads", attn.q_lin.out_features)
        parts.append(
            LayerParts(
                block=block,
                attention=attn,
                query=attn.q_lin,
                key=attn.k_lin,
                value=attn.v_lin,
                attn_out=attn.out_lin,
                ffn_in=block.ffn.lin1,
                ffn_out=block.ffn.lin2,
                num_heads=heads,
                head_dim=head_dim,
                heads_attr="n_heads",
            )
        )
    return parts


def _vit_layers(model: nn.Module) -> list[LayerParts]:
    parts = []
    for block in _base(model, "layers").layers:
        attn = block.attention
        attr = "num_heads" if hasattr(attn, "num_heads") else "num_attention_heads"
        heads, head_dim = _heads(attn, attr, attn.q_proj.out_features)
        parts.append(
            LayerParts(
                block=block,
                attention=attn,
                query=attn.q_proj,
                key=attn.k_proj,
                value=attn.v_proj,
                attn_out=attn.o_proj,
                ffn_in=block.mlp.fc1,
                ffn_out=block.mlp.fc2,
                num_heads=heads,
                head_dim=head_dim,
                heads_attr=attr,
            )
        )
    return parts


def _word_embeddings(model: nn.Module) -> list[nn.Embedding]:
    base = _base(model, "embeddings")
    emb = getattr(base.embeddings, "word_embeddings", None)
    return [emb] if isinstance(emb, nn.Embedding) else []


ADAPTERS: dict[str, Adapter] = {
    "bert": Adapter(
        "bert",
        ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        _bert_layers,
        _word_embeddings,
    ),
    "distilbert": Adapter("distilbert", ("distilbert",), _distilbert_layers, _word_embeddings),
    "vit": Adapter("vit", ("vit", "deit"), _vit_layers, _word_embeddings),
}


def family_of(model_type: str) -> str:
    """The adapter family for a Hugging Face ``config.model_type``."""
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter.family
    known = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise SourceError(f"unsupported architecture {model_type!r}; supported model types: {known}")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a loaded Hugging Face model, by its ``config.model_type``."""
    config = getattr(model, "config", None)
    if config is None:
        raise SourceError(
            f"{type(model).__name__} has no Hugging Face config; supported families: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[family_of(config.model_type)]


def embedding_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """The word and position embedding tables, by module name."""
    found = list(adapter_for(model).embeddings(model))
    prefix = str(getattr(model, "base_model_prefix", ""))
    base = getattr(model, prefix) if prefix and hasattr(model, prefix) else model
    position = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if isinstance(position, nn.Embedding):
        found.append(position)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(table)]: table for table in found}
