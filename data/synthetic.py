"""Synthetic recall tasks: passkey retrieval and multi-query associative recall (MQAR).

Both make rows of exactly `seq_len` tokens whose labels are IGNORE (-100) except at the
answers, so a model trained on them (`data=passkey`, `data=mqar`) is scored only on recall,
and eval.py measures the same tasks on any checkpoint.

- Passkey: a haystack of corpus text with a needle ("The pass key is 48213. Remember it. 48213
  is the pass key.") at a chosen depth, ending with "What is the pass key? The pass key is "
  and the digits; the answer is the digits (exact match of all of them counts).
- MQAR (Arora et al., Zoology, 2023): `n_pairs` key-value pairs (keys and values drawn without
  repetition from two disjoint token ranges), then queries: stored keys in random order, each
  followed by its value; the answer is each queried value (labels at the query keys).
  Chance: 1 / n_pairs for a model that copies some stored value, 1 / n_values otherwise.
  `n_pairs` may be a list: each row draws its count from it, so a model trained on the mix
  cannot learn where one count's query region starts instead of recalling.
  `min_len` > 0 packs a training row with independent instances, each its own document
  (cu_seqlens, positions from 0), of lengths drawn log-uniformly in [min_len, seq_len]: every
  distance up to seq_len is trained, and a row holds several examples instead of one (an 8k
  row of one instance repeats its few pairs thousands of times: one example per row).
- Mixture: each row is one of several tasks, drawn with the given weights (`data=recall`:
  MQAR and passkey rows in one run).

`SyntheticBatches` serves either task to train.py like data/loader.PackedBatches: row i of
step s is generated from the seed (seed, s, i) alone, so the global batch of a step does not
depend on how it is split over micro-batches and data-parallel ranks, and a resume (any world
size) continues the same stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # models/loss.py IGNORE_INDEX
VAL_SEED = 0x5EED  # validation rows come from their own stream, never from a training step's


def _row_rng(seed: int, step: int, row: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, row])


@dataclass(frozen=True)
class MQAR:
    n_pairs: int | tuple = 8  # pairs per row, or the counts each row draws its own from
    n_keys: int = 64     # keys are token ids [first, first + n_keys)
    n_values: int = 64   # values follow: [first + n_keys, first + n_keys + n_values)
    first: int = 0       # first token id used (byte tokenizer: ids < 256 are all plain tokens)
    min_len: int = 0     # > 0: training rows are instances of log-uniform lengths >= min_len

    @property
    def pair_counts(self) -> tuple:
        return tuple(self.n_pairs) if isinstance(self.n_pairs, (tuple, list)) else (self.n_pairs,)

    def check(self, vocab: int, seq_len: int) -> None:
        counts = self.pair_counts
        if (not counts or any(isinstance(n, bool) or not isinstance(n, int) for n in counts)
                or min(*counts, self.n_keys, self.n_values) < 1 or self.first < 0):
            raise ValueError(f"data: mqar needs n_pairs (an integer or a list of them), n_keys, "
                             f"n_values >= 1 (got {self.n_pairs}, {self.n_keys}, {self.n_values})")
        most = max(counts)
        if most > min(self.n_keys, self.n_values):
            raise ValueError(f"data.n_pairs={self.n_pairs} must be <= data.n_keys={self.n_keys} and "
                             f"data.n_values={self.n_values} (keys and values do not repeat)")
        if self.first + self.n_keys + self.n_values > vocab:
            raise ValueError(f"data: mqar token ids reach {self.first + self.n_keys + self.n_values}"
                             f", beyond the tokenizer's vocabulary of {vocab}")
        if seq_len < 2 * most + 2:
            raise ValueError(f"trainer.seq_len={seq_len} is too short for data.n_pairs="
                             f"{self.n_pairs} (needs 2 * n_pairs + 2 tokens)")
        if self.min_len and not 2 * most + 2 <= self.min_len <= seq_len:
            raise ValueError(f"data.min_len={self.min_len} must be 0 (one instance per row) or "
                             f"in [2 * max(n_pairs) + 2, trainer.seq_len] = [{2 * most + 2}, "
                             f"{seq_len}]")

    def sample(self, rng: np.random.Generator, seq_len: int, n_pairs: int | None = None):
        """(input ids, labels), int64 [seq_len] each; `n_pairs` None: the row's own count
        (drawn from the list when n_pairs is one)."""
        counts = self.pair_counts
        n = n_pairs if n_pairs is not None else (
            counts[0] if len(counts) == 1 else int(counts[rng.integers(len(counts))]))
        keys = rng.choice(self.n_keys, n, replace=False) + self.first
        values = rng.choice(self.n_values, n, replace=False) + self.first + self.n_keys
        ids = np.empty(seq_len + 1, dtype=np.int64)
        ids[0:2 * n:2], ids[1:2 * n:2] = keys, values
        queries = (seq_len + 1 - 2 * n) // 2
        # every stored key is queried once before any repeats (the first n queries are a
        # permutation), so short rows still test all pairs
        order = np.concatenate([rng.permutation(n) for _ in range(-(-queries // n))])[:queries]
        q0 = 2 * n
        ids[q0:q0 + 2 * queries:2], ids[q0 + 1:q0 + 2 * queries:2] = keys[order], values[order]
        ids[q0 + 2 * queries:] = keys[0]  # an odd leftover token: never scored
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        labels[q0:q0 + 2 * queries:2] = ids[q0 + 1:q0 + 2 * queries + 1:2]
        return ids[:seq_len], labels

    def row(self, rng: np.random.Generator, seq_len: int):
        """A training row: (ids, labels, document starts); one instance unless min_len > 0."""
        if not self.min_len:
            return (*self.sample(rng, seq_len), [0])
        parts, starts, left = [], [], seq_len
        while left:
            n = int(np.exp(rng.uniform(np.log(self.min_len), np.log(seq_len))))
            n = left if left - n < self.min_len else n  # no piece shorter than min_len
            starts.append(seq_len - left)
            parts.append(self.sample(rng, n))
            left -= n
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                starts)


@dataclass(frozen=True)
class Passkey:
    haystack: np.ndarray  # corpus token ids to cut the haystack from
    needle: tuple         # token ids of the needle text before the digits, and after them
    question: tuple       # token ids of the question (ends right before the answer)
    digit_ids: tuple      # token id of '0'..'9'
    digits: int = 5

    @classmethod
    def build(cls, tokenizer, haystack: np.ndarray, digits: int = 5) -> "Passkey":
        if not 1 <= digits <= 12:
            raise ValueError(f"data.digits={digits} must be in 1..12")
        enc = tokenizer.encode
        digit_ids = tuple(enc(str(d))[-1] for d in range(10))
        return cls(haystack=np.asarray(haystack, dtype=np.int64),
                   needle=(tuple(enc(" The pass key is ")), tuple(enc(". Remember it. ")),
                           tuple(enc(" is the pass key. "))),
                   question=tuple(enc(" What is the pass key? The pass key is ")),
                   digit_ids=digit_ids, digits=digits)

    def overhead(self) -> int:
        return sum(map(len, self.needle)) + len(self.question) + 3 * self.digits

    def sample(self, rng: np.random.Generator, seq_len: int, depth: float | None = None):
        """(input ids, labels, answer positions), the needle's start at `depth` (0: the row's
        start, 1: right before the question) of the haystack; random depth when None."""
        room = seq_len - self.overhead()
        if room < 1:
            raise ValueError(f"passkey: seq_len={seq_len} leaves no room for the haystack "
                             f"(needle and question take {self.overhead()} tokens)")
        if len(self.haystack) <= room:
            raise ValueError(f"passkey: the haystack corpus has {len(self.haystack)} tokens, "
                             f"fewer than the {room} a row of {seq_len} needs")
        key = rng.integers(0, 10, self.digits)
        key[0] = rng.integers(1, 10)  # no leading zero: the number reads the same in any form
        key_ids = [self.digit_ids[d] for d in key]
        needle = [*self.needle[0], *key_ids, *self.needle[1], *key_ids, *self.needle[2]]
        start = int(rng.integers(0, len(self.haystack) - room))
        hay = self.haystack[start:start + room]
        cut = int(round((rng.random() if depth is None else depth) * room))
        # exactly seq_len tokens: the answer's digits are the row's last tokens
        ids = np.concatenate([hay[:cut], needle, hay[cut:], self.question, key_ids]).astype(np.int64)
        labels = np.full(seq_len, IGNORE, dtype=np.int64)
        answer = np.arange(seq_len - self.digits, seq_len)  # positions holding the digits
        labels[answer - 1] = ids[answer]  # each digit is predicted from the token before it
        return ids, labels, answer - 1

    def row(self, rng: np.random.Generator, seq_len: int):
        """A training row: (ids, labels, document starts), the needle at a random depth."""
        return (*self.sample(rng, seq_len)[:2], [0])


@dataclass(frozen=True)
class Mixture:
    """Each row is one task of `tasks`, drawn with probabilities proportional to `weights`."""
    tasks: tuple
    weights: tuple

    def row(self, rng: np.random.Generator, seq_len: int):
        """(ids, labels, document starts) of one row of the task drawn for it."""
        p = np.asarray(self.weights, dtype=float)
        task = self.tasks[int(rng.choice(len(self.tasks), p=p / p.sum()))]
        return task.row(rng, seq_len)


def _batch(rows: list[tuple]) -> dict:
    """Micro-batch dict of rows (ids, labels, document starts): positions count from each
    document's start; cu_seqlens (flattened, int32) only when some row holds several."""
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    labels = torch.from_numpy(np.stack([r[1] for r in rows]))
    B, T = ids.shape
    pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))
    for i, (_, _, starts) in enumerate(rows):
        for a, b in zip(starts, [*starts[1:], T]):
            pos[i, a:b] -= a
    cu = None
    if any(len(r[2]) > 1 for r in rows):
        cu = torch.tensor([i * T + a for i, r in enumerate(rows) for a in r[2]] + [B * T],
                          dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "positions": torch.from_numpy(pos),
            "cu_seqlens": cu}


class SyntheticBatches:
    """train.py's data iterator for a synthetic task (see the module docstring)."""

    def __init__(self, task, seq_len: int, micro_batch: int, grad_accum: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0):
        self.task, self.seq_len, self.seed = task, int(seq_len), int(seed)
        self.micro_batch, self.grad_accum = int(micro_batch), int(grad_accum)
        self.dp_rank, self.dp_world = int(dp_rank), int(dp_world)
        self.global_batch = self.micro_batch * self.grad_accum * self.dp_world
        self.step = 0

    def rows(self, step: int, first: int, count: int, seed: int | None = None) -> dict:
        seed = self.seed if seed is None else seed
        return _batch([self.task.row(_row_rng(seed, step, i), self.seq_len)
                       for i in range(first, first + count)])

    def next_step(self) -> list[dict]:
        mb = self.micro_batch
        out = [self.rows(self.step, (m * self.dp_world + self.dp_rank) * mb, mb)
               for m in range(self.grad_accum)]
        self.step += 1
        return out

    def validation(self, n_batches: int) -> list[dict]:
        """This rank's share of `n_batches` fixed micro-batches (their own seed stream)."""
        usable = n_batches - n_batches % self.dp_world or self.dp_world
        return [self.rows(0, j * self.micro_batch, self.micro_batch, seed=VAL_SEED + self.seed)
                for j in range(self.dp_rank, usable, self.dp_world)]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "task": type(self.task).__name__}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(f"data: cannot resume, the saved data state has seq_len="
                             f"{state['seq_len']} but this run has {self.seq_len}")
        self.step, self.seed = int(state["step"]), int(state["seed"])
