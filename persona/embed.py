"""Prompt embeddings from the frozen base: what the router and supersession detection compare.

A text's embedding is the base decoder's last hidden state, mean-pooled over the text's tokens,
the first token left out (it is the attention sink: a huge norm that says nothing about content),
unless it is the only token. No LM head, no adapter: one base forward per batch of texts.

>>> embed_texts(base.model, base.tokenizer, ["Where do I live?"]).shape   # doctest: +SKIP
torch.Size([1, 576])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import pad_rows

__all__ = ["EMBEDDING_ID", "SENTENCE_EMBEDDING_ID", "embed_sentences", "embed_texts"]

EMBEDDING_ID = "decoder-last-hidden/mean-skip-first/v1"  # bump when the embedding changes: caches keyed on it miss
SENTENCE_EMBEDDING_ID = "decoder-last-hidden/prompt-eol-last-token/v1"
# PromptEOL (Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models"): asking a
# decoder to sum a text up "in one word" makes its next-token state a sentence embedding; the
# paper's template, unchanged.
_EOL_TEMPLATE = 'This sentence : "{}" means in one word:"'


@torch.inference_mode()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, max_tokens: int = 256,
                batch_size: int = 16) -> torch.Tensor:
    """One float32 row per text (on the CPU): the mean-pooled last hidden state, sink left out.

    ``model`` must run as the base alone (no adapter active); texts keep their last ``max_tokens``
    tokens.
    """
    if not texts:
        return torch.zeros(0, 0)
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t, add_special_tokens=False).input_ids[-max_tokens:] or [pad] for t in texts[start:start + batch_size]]
        input_ids, mask = (t.to(device) for t in pad_rows(ids, pad))
        hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        pool = mask.clone().float()
        pool[:, 0] = torch.where(mask.sum(1) > 1, 0.0, 1.0)  # skip the sink unless it is all there is
        rows.append((hidden * pool.unsqueeze(-1)).sum(1) / pool.sum(1, keepdim=True))
    return torch.cat(rows).cpu()


@torch.inference_mode()
def embed_sentences(model: Any, tokenizer: Any, texts: Sequence[str], *, max_tokens: int = 256,
                    batch_size: int = 16) -> torch.Tensor:
    """One float32 row per text (on the CPU): the base's last hidden state at the last token of the
    PromptEOL template around the text (``This sentence : "TEXT" means in one word:"``).

    What memory retrieval compares (``MemoryConfig(retrieval="fused")``): on benchmarks/memory.py it
    finds paraphrased facts among unrelated entries where :func:`embed_texts` (mean-pooled, built
    for routing) does not. ``model`` must run as the base alone; a text keeps its last
    ``max_tokens`` tokens.
    """
    if not texts:
        return torch.zeros(0, 0)
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head, tail = _EOL_TEMPLATE.split("{}")
    rows = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(head + tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids[-max_tokens:])
                         + tail, add_special_tokens=False).input_ids for t in texts[start:start + batch_size]]
        input_ids, mask = (t.to(device) for t in pad_rows(ids, pad))  # right-padded: pads come after, unseen
        hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        last = mask.sum(1) - 1
        rows.append(hidden[torch.arange(len(ids), device=device), last])
    return torch.cat(rows).cpu()
