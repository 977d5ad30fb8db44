"""Tokenisation with the loss on the answer only, packing, and batch collation."""

from __future__ import annotations

from riemann_zero.data.prompts import render_prompt

__all__ = ["tokenize", "Collator"]


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize(
    examples: list[dict],
    tokenizer,
    *,
    template: str = "chat",
    max_length: int = 256,
    packing: bool = False,
) -> list[dict]:
    """Token ids and labels with the loss on the answer only.

    Each example becomes ``prompt + answer + eos`` where the prompt is
    ``render_prompt(instruction, template, tokenizer)`` and every prompt position is labelled
    -100. Prompt and answer are tokenised separately, so the label boundary is exact.

    Truncation to ``max_length`` cuts the prompt first, from the left (keeping a leading BOS and
    the template's answer header next to the answer); an answer longer than ``max_length / 2``
    is cut from the right (and loses its eos) once the prompt is down to ``max_length / 2``.

    Args:
        examples: from ``load_examples``.
        tokenizer: a Hugging Face tokenizer with an eos token.
        template: ``"chat"`` or ``"alpaca"`` (see ``render_prompt``).
        max_length: longest row in tokens.
        packing: concatenate whole examples greedily into rows of at most ``max_length`` tokens;
            rows then carry ``position_ids`` restarting at 0 for each example, from which
            transformers builds a block-diagonal causal mask (see ``Collator``).

    Returns:
        ``[{"input_ids": [...], "labels": [...]}]`` (plus ``"position_ids"`` when packing).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (prompt + answer token), but got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before tokenize")
    bos = tokenizer.bos_token_id
    rows = []
    for ex in examples:
        prompt = render_prompt(ex["instruction"], template, tokenizer)
        # The chat template writes its own special tokens; Alpaca text gets the tokenizer's (BOS).
        p = _encode(tokenizer, prompt, special=template != "chat")
        a = _encode(tokenizer, ex["answer"], special=False) + [eos]
        if len(p) + len(a) > max_length:
            keep = max(max_length - len(a), min(len(p), max_length // 2))
            if keep < len(p):
                head = [p[0]] if p[0] == bos and keep > 1 else []
                p = head + p[len(p) - keep + len(head):]
            a = a[: max_length - len(p)]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return _pack(rows, max_length) if packing else rows


def _pack(rows: list[dict], max_length: int) -> list[dict]:
    """Greedy in-order packing of whole examples; position ids restart per example."""
    packed: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        n = len(row["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += row["input_ids"]
        current["labels"] += row["labels"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed


class Collator:
    """Pads a list of ``tokenize`` rows into a batch of tensors (right padding).

    Unpacked rows give ``input_ids``, ``labels`` (padding -100) and ``attention_mask``. Packed
    rows give ``input_ids``, ``labels`` and ``position_ids`` and deliberately **no**
    ``attention_mask``: transformers derives the per-example (block-diagonal) causal mask from
    restarting position ids only when the mask is absent and no KV cache is used, so call the
    model with ``use_cache=False`` when training on packed rows. Padding then forms its own block.

    Args:
        tokenizer: supplies ``pad_token_id`` (else ``eos_token_id``).
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8).
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id; set one")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, but got {pad_to_multiple_of}")
        self.pad_token_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if not rows:
            raise ValueError("cannot collate an empty batch")
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]
        batch: dict[str, list] = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for r in rows:
            n = len(r["input_ids"])
            pad = width - n
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [-100] * pad)
            if packed:
                batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
