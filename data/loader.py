"""Batches of packed rows for training (shuffled, resumable, data-parallel) and validation.

One optimizer step consumes a global batch of G = micro_batch * grad_accum * dp_world rows,
taken in order from a per-epoch permutation of all rows. Within a step, micro step m of DP
rank r gets the step's rows [(m*dp_world + r)*micro_batch, ... + micro_batch). The set of
rows of a step therefore depends only on (seed, G): 1 process with grad_accum=2 trains on
the same global batch as 2 processes with grad_accum=1, and a run can resume under another
(grad_accum, dp_world) factorisation of the same G.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from data.packing import find_bos, num_rows, pack


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if int(v) != v or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _to_torch(arrays: dict) -> dict:
    inputs = arrays["input_ids"]
    cu = arrays["cu_seqlens"]
    return {
        "input_ids": torch.from_numpy(inputs),
        "labels": torch.from_numpy(arrays["labels"]),
        "positions": torch.from_numpy(arrays["positions"]),
        "cu_seqlens": None if cu is None else torch.from_numpy(cu),
    }


class PackedBatches:
    """Iterator over optimizer steps; each step is this rank's list of grad_accum micro-batches.

    Micro-batch dict: input_ids, labels, positions (int64 [B, T]); cu_seqlens (int32 [N+1]
    over the B*T flattened tokens, or None without document_mask).
    `bos_id` defaults to tokens[0]: a stream built by data/ always starts with a separator.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, grad_accum: int,
                 dp_rank: int = 0, dp_world: int = 1, shuffle: bool = True, seed: int = 0,
                 document_mask: bool = True, bos_id: int | None = None):
        _check_positive(seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum,
                        dp_world=dp_world)
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, dp_world={dp_world}), got {dp_rank}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if len(tokens) == 0:
            raise ValueError("data: the token stream is empty")
        self.tokens = tokens
        self.seq_len, self.micro_batch, self.grad_accum = int(seq_len), int(micro_batch), int(grad_accum)
        self.dp_rank, self.dp_world = int(dp_rank), int(dp_world)
        self.shuffle, self.seed, self.document_mask = bool(shuffle), int(seed), bool(document_mask)
        self.bos_id = int(tokens[0]) if bos_id is None else int(bos_id)
        self.rows = num_rows(len(tokens), self.seq_len)
        self.global_batch = self.micro_batch * self.grad_accum * self.dp_world
        self.steps_per_epoch = self.rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: the corpus makes {self.rows} rows of seq_len={self.seq_len} tokens, fewer "
                f"than one global batch of {self.global_batch} rows (trainer.micro_batch="
                f"{self.micro_batch} x grad_accum={self.grad_accum} x dp={self.dp_world}); use more "
                "data (data.max_bytes / data.max_docs) or a smaller batch or seq_len")
        self._bos_pos = find_bos(tokens, self.bos_id)
        self.epoch = 0
        self.step = 0  # steps already taken in the current epoch
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                # RandomState's stream is frozen by numpy's compatibility policy (resumes stay
                # exact across numpy upgrades); seeding with the pair (seed, epoch) keeps runs
                # with neighbouring seeds from sharing permutations
                self._order = np.random.RandomState([self.seed, epoch]).permutation(self.rows)
            else:
                self._order = np.arange(self.rows)
            self._order_epoch = epoch
        return self._order

    def _next_position(self) -> tuple[int, int]:
        # an epoch ends when fewer than a full global batch of rows is left in it
        if self.step >= self.steps_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.step

    def step_rows(self) -> np.ndarray:
        """Row indices of the next step's whole global batch (all ranks, all micro steps)."""
        epoch, step = self._next_position()
        g = self.global_batch
        return self._epoch_order(epoch)[step * g:(step + 1) * g].copy()

    def next_step(self) -> list[dict]:
        """This rank's grad_accum micro-batches for the next optimizer step."""
        rows = self.step_rows()
        mb = self.micro_batch
        out = []
        for m in range(self.grad_accum):
            lo = (m * self.dp_world + self.dp_rank) * mb
            arrays = pack(self.tokens, rows[lo:lo + mb], self.seq_len, self.bos_id,
                          self._bos_pos, self.document_mask)
            out.append(_to_torch(arrays))
        self.epoch, self.step = self._next_position()
        self.step += 1
        return out

    def __iter__(self) -> Iterator[list[dict]]:
        while True:  # endless: epochs roll over; the trainer decides when to stop
            yield self.next_step()

    def state_dict(self) -> dict:
        """Global (identical on every rank) position in the data; plain ints and bools."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "rows": self.rows,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seq_len", self.seq_len), ("global_batch", self.global_batch),
                          ("rows", self.rows), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                hint = {"seq_len": "the sequence length",
                        "global_batch": "trainer.micro_batch x grad_accum x dp",
                        "rows": "the corpus (data.*) or seq_len",
                        "shuffle": "data.shuffle"}[key]
                raise ValueError(f"data: cannot resume, the saved data state has {key}={state[key]} "
                                 f"but this run has {key}={mine} (changed {hint})")
        if int(state["seed"]) != self.seed:
            warnings.warn(f"data: resuming with the saved data seed {state['seed']} instead of "
                          f"{self.seed}, so that the batch order continues exactly")
        self.seed = int(state["seed"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._order_epoch = None


def val_batches(tokens: np.ndarray, seq_len: int, micro_batch: int, n_batches: int,
                dp_rank: int = 0, dp_world: int = 1, document_mask: bool = True,
                bos_id: int | None = None) -> list[dict]:
    """Fixed validation micro-batches: the first n_batches*micro_batch rows, in order.

    `n_batches` counts micro-batches over all ranks; rank r takes micro-batches r, r+dp_world,
    ... so the union over ranks is the single-process set and every rank gets the same number
    (the count is rounded down to a multiple of dp_world, and to what the corpus holds, with
    a warning).
    """
    _check_positive(seq_len=seq_len, micro_batch=micro_batch, n_batches=n_batches,
                    dp_world=dp_world)
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank must be in [0, dp_world={dp_world}), got {dp_rank}")
    bos = int(tokens[0]) if bos_id is None else int(bos_id)
    rows = num_rows(len(tokens), seq_len)
    usable = min(int(n_batches), rows // micro_batch)
    usable -= usable % dp_world
    if usable == 0:
        raise ValueError(
            f"data: the validation corpus makes {rows} rows of seq_len={seq_len} tokens, fewer "
            f"than one micro-batch of {micro_batch} rows per DP rank ({dp_world} ranks)")
    if usable < n_batches:
        warnings.warn(f"data: validation uses {usable} micro-batches instead of data.val_batches="
                      f"{n_batches} ({rows} rows of seq_len={seq_len}, micro_batch={micro_batch}, "
                      f"dp={dp_world})")
    bos_pos = find_bos(tokens, bos)
    out = []
    for j in range(dp_rank, usable, dp_world):
        rows_j = np.arange(j * micro_batch, (j + 1) * micro_batch)
        out.append(_to_torch(pack(tokens, rows_j, seq_len, bos, bos_pos, document_mask)))
    return out
