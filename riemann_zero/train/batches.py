"""The driver's data: the recipe's examples tokenised once, and this rank's micro-batches in a
deterministic order (:func:`~riemann_zero.train.build.batch_order`), so the data-loader position
saved in a checkpoint is just a count of micro-batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from riemann_zero.data.examples import has_eval_split, load_examples
from riemann_zero.data.tokens import Collator, tokenize
from riemann_zero.progress import stage
from riemann_zero.train.build import batch_order
from riemann_zero.train.recipe import Recipe

__all__ = ["RunData", "load_data", "collate", "count_tokens"]


def collate(items: list[dict], idx: list[int], collator: Any, device: Any) -> dict:
    """The examples ``idx`` of ``items`` as one batch on ``device``."""
    batch = collator([items[i] for i in idx])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["use_cache"] = False  # packed rows rely on it; training never needs the KV cache
    return batch


def count_tokens(batch: dict) -> int:
    """Tokens of ``batch`` that carry a label (what the loss averages over)."""
    return int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else 0


@dataclass
class RunData:
    """Tokenised train and eval items, and this rank's place in the data order.

    Attributes:
        micro_per_epoch: this rank's micro-batches per epoch.
    """

    train: list[dict]
    eval: list[dict]
    collator: Any
    seed: int
    rank: int
    world: int
    micro: int
    micro_per_epoch: int
    _orders: dict[int, list] = field(default_factory=dict, repr=False)

    def micro_batch(self, k: int, device: Any) -> dict:
        """The k-th micro-batch of this rank since the start of training."""
        epoch, j = divmod(k, self.micro_per_epoch)
        if epoch not in self._orders:
            self._orders.clear()
            self._orders[epoch] = batch_order(len(self.train), seed=self.seed, epoch=epoch,
                                              rank=self.rank, world=self.world, micro=self.micro)
        return collate(self.train, self._orders[epoch][j], self.collator, device)

    def calibration(self, batches: int, device: Any) -> list[dict]:
        """This rank's share of the first ``batches`` micro-batches of the whole-world order
        (LOI's and LoRA-GA's calibration: every rank builds the same model, none does all
        passes)."""
        per_rank = -(-batches // self.world)
        first = batch_order(len(self.train), seed=self.seed, epoch=0, rank=0, world=1,
                            micro=self.micro)
        mine = first[: per_rank * self.world][self.rank::self.world]
        return [collate(self.train, idx, self.collator, device) for idx in mine]


def _examples(recipe: Recipe) -> tuple[list, list]:
    """The recipe's train and eval examples (``holdout``: the first ``eval_limit`` shuffled
    examples of the train data, which then never train)."""
    dc = recipe.data
    if dc.eval_split == "holdout":
        limit = None if dc.train_limit is None else dc.train_limit + dc.eval_limit
        pool = load_examples(dc.train, split="train", limit=limit, seed=recipe.seed)
        return pool[dc.eval_limit:], pool[:dc.eval_limit]
    train_ex = load_examples(dc.train, split="train", limit=dc.train_limit, seed=recipe.seed)
    source = dc.eval or dc.train
    split = "eval" if has_eval_split(source) else "train"  # a separate eval file: all
    eval_ex = load_examples(source, split=split, limit=dc.eval_limit,
                            seed=recipe.seed) if dc.eval_limit else []
    return train_ex, eval_ex


def load_data(recipe: Recipe, model_path: str, *, rank: int, world: int) -> RunData:
    """Read, tokenise and order the recipe's data for this rank."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dc = recipe.data
    with stage(f"loading data.train={dc.train}" + (f" (limit {dc.train_limit})"
                                                   if dc.train_limit else "")):
        train_ex, eval_ex = _examples(recipe)
    tok_kw = {"template": dc.template, "max_length": dc.max_length}
    with stage(f"tokenising {len(train_ex)} train and {len(eval_ex)} eval examples"):
        train_items = tokenize(train_ex, tokenizer, packing=dc.packing, **tok_kw)
        eval_items = tokenize(eval_ex, tokenizer, **tok_kw) if eval_ex else []
    mb = recipe.train.micro_batch_size
    micro_per_epoch = len(batch_order(len(train_items), seed=recipe.seed, epoch=0, rank=rank,
                                      world=world, micro=mb))
    return RunData(train=train_items, eval=eval_items, collator=Collator(tokenizer),
                   seed=recipe.seed, rank=rank, world=world, micro=mb,
                   micro_per_epoch=micro_per_epoch)
