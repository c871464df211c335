"""Held-out English text every machine has: the Python documentation topics shipped with CPython
(`pydoc_data.topics.topics`, ~79 documents, ~460 kB), which no model here was tuned to reproduce verbatim.

Documents are taken in sorted topic order and encoded as maxlm stores a document ([bos] ids eos, by
data_pipelines.tokenized.encode_documents); both sides of every comparison score these same token arrays.
"""

from __future__ import annotations

import platform
import sys

import numpy as np


def source() -> tuple[list[str], dict]:
  """(the documents' texts in sorted topic order, a record of where they came from)."""
  import pydoc_data.topics as module

  topics = module.topics
  texts = [topics[k] for k in sorted(topics)]
  return texts, {"source": "pydoc_data.topics.topics", "python": platform.python_version(),
                 "python_build": sys.version.split("\n")[0], "path": module.__file__, "documents": len(texts),
                 "bytes": sum(len(t.encode("utf-8")) for t in texts)}


def _encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
  from data_pipelines.sources import Document
  from data_pipelines.tokenized import encode_documents

  return [ids.astype(np.int32) for _, ids in encode_documents([Document(t, "pydoc") for t in texts], tokenizer)]


def documents(tokenizer, texts: list[str], budget: int) -> tuple[list[np.ndarray], list[str]]:
  """The first documents, encoded, whose scored tokens (each document's tokens but its first) add up to `budget`:
  the last one is the longest prefix of its text (cut at a character) that fits. Returns (token arrays, texts)."""
  if budget < 1:
    raise ValueError(f"the token budget must be >= 1, got {budget}")
  docs, used, left = [], [], budget
  for text, ids in zip(texts, _encode(tokenizer, texts), strict=True):
    if len(ids) - 1 > left:
      lo, hi = 0, len(text)  # the longest prefix whose encoding fits: encode length grows with the prefix
      while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_encode(tokenizer, [text[:mid]])[0]) - 1 <= left:
          lo = mid
        else:
          hi = mid - 1
      text = text[:lo]
      ids = _encode(tokenizer, [text])[0] if lo else ids[:0]
    if len(ids) > 1:
      docs.append(ids)
      used.append(text)
      left -= len(ids) - 1
    if left <= 0:
      break
  return docs, used


def rows(docs: list[np.ndarray], length: int, count: int) -> np.ndarray:
  """`count` rows of length + 1 consecutive tokens of the documents laid end to end [count, length + 1]."""
  stream = np.concatenate(docs)
  need = count * (length + 1)
  if len(stream) < need:
    raise ValueError(f"the held-out text has {len(stream)} tokens, {need} needed")
  return stream[:need].reshape(count, length + 1)


def prompts(docs: list[np.ndarray], count: int, length: int) -> list[list[int]]:
  """`count` prompts of `length` tokens: the start of each document long enough, then later windows of them."""
  long_enough = [d for d in docs if len(d) >= length]
  out = []
  offset = 0
  while len(out) < count and long_enough:
    for d in long_enough:
      if offset + length <= len(d) and len(out) < count:
        out.append([int(t) for t in d[offset:offset + length]])
    offset += length
    long_enough = [d for d in long_enough if offset + length <= len(d)]
  if len(out) < count:
    raise ValueError(f"the held-out text gives only {len(out)} prompts of {length} tokens")
  return out


# Programming requests for the coder models' speculative decoding (their use: a user asks for code). Written here
# for this benchmark, so neither model saw these prompts; the answers they generate are their own.
CODING_REQUESTS = (
  "Write a Python function that merges two sorted lists into one sorted list without using sort().",
  "Write a Python class for an LRU cache with get and put methods, both O(1).",
  "Write a Python function that parses a CSV line with quoted fields that may contain commas.",
  "Write a Python function that returns the longest common subsequence of two strings.",
)


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
  """`count` CODING_REQUESTS rendered with the model's own chat template (generation prompt added), as ids."""
  from data_pipelines.chat_template import chat_messages, chat_prompt_ids, template_of

  if not 1 <= count <= len(CODING_REQUESTS):
    raise ValueError(f"chat prompts: 1 to {len(CODING_REQUESTS)}, got {count}")
  template = template_of(tokenizer)
  return [chat_prompt_ids(tokenizer, template, chat_messages(q)) for q in CODING_REQUESTS[:count]]
