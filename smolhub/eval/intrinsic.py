"""Intrinsic evaluation: how well a checkpoint predicts a dataset's text, in nats per token and in
bits per byte.

Nats per token depend on the tokenizer: a model whose tokens are longer pays more per token for the
same text. Bits per byte divide the same summed losses by the UTF-8 bytes the predicted tokens stand
for, so models with different tokenizers are scored on one scale. Special tokens (the EOS between
documents) are text of no bytes: their losses count in the loss per token, not in bits per byte.

The text is the one the trainer validates on: the dataset prepared with the checkpoint's tokenizer
(smolhub.data, sharing the trainer's cache in `data_dir`), cut into the windows of block_size
targets that the trainer's validation loader reads, each scored with its full context. Every window
is scored on its own, so the numbers do not depend on the batch size (except for an MoE model with a
capacity factor, whose routing drops tokens per batch).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from smolhub.data import PackedLoader, prepare_dataset
from smolhub.data.prepare import HELD_OUT_WINDOW
from smolhub.errors import UserError
from smolhub.tokenizer import token_byte_lengths

SPLITS = ("val", "train")


def _stderr_of_mean(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def _stderr_of_ratio(numerators: np.ndarray, denominators: np.ndarray) -> float | None:
    """Standard error of sum(numerators) / sum(denominators) over independent pairs (the delta method)."""
    n = len(numerators)
    if n < 2:
        return None
    ratio = numerators.sum() / denominators.sum()
    residuals = numerators - ratio * denominators
    return float(math.sqrt((residuals ** 2).sum() / (n * (n - 1))) / denominators.mean())


@torch.no_grad()
def _score_windows(model: torch.nn.Module, loader: PackedLoader, n_windows: int, byte_lengths: torch.Tensor,
                   batch_size: int, desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per window: (nats summed over all targets, nats summed over the targets that are text, bytes of
    those targets), float64."""
    device = next(model.parameters()).device
    nats, text_nats, n_bytes = [], [], []
    with tqdm(total=n_windows * loader.block_size, desc=desc, unit="tok", unit_scale=True) as bar:
        for start in range(0, n_windows, batch_size):
            rows = [loader.next_batch() for _ in range(min(batch_size, n_windows - start))]
            x = torch.cat([r[0] for r in rows]).to(device)
            y = torch.cat([r[1] for r in rows]).to(device)
            logits, _ = model(x)
            for row_logits, targets in zip(logits, y):  # one row's fp32 logits at a time bounds the memory
                losses = F.cross_entropy(row_logits.float(), targets, reduction="none").double()
                lengths = byte_lengths[targets]
                nats.append(losses.sum())
                text_nats.append(losses[lengths > 0].sum())
                n_bytes.append(lengths.sum())
            bar.update(y.numel())
    return tuple(torch.stack(v).cpu().numpy().astype(np.float64) for v in (nats, text_nats, n_bytes))


def evaluate_text(engine, dataset: str, *, data_dir: str = "data_cache", max_tokens: int = 0, batch_size: int = 8,
                  val_fraction: float = 0.01, split: str = "val") -> dict:
    """Loss, perplexity and bits per byte of `engine`'s model (what smolhub.inference.load_model
    returns) on `dataset` (any --dataset the trainer takes: a Hub name, a file or a folder).

    split "val" is the trainer's validation text: the dataset's own validation split, else the last
    `val_fraction` of its tokens (the trainer's --val_fraction); "train" is the rest. `max_tokens`
    scores only the first windows holding that many targets (rounded up to whole windows; 0 = the
    whole split, less the last targets that do not fill a window). `batch_size` windows run at once.

    Returns loss (nats/token), perplexity (exp of the loss), bpb (bits per byte: the losses of the
    targets that are text, summed, over ln 2 times their UTF-8 bytes), each with its standard error
    (`*_stderr`) over windows of block_size targets, treated as independent (neighbouring windows of
    one document are not quite: the errors are a little optimistic), None for a single window; and
    tokens (targets scored), bytes, windows, block_size, dataset and split.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, not {batch_size}")
    if max_tokens < 0:
        raise UserError(f"max_tokens must be 0 (the whole split) or positive, not {max_tokens}")
    model, tokenizer = engine.model, engine.tokenizer
    block_size = model.config.block_size
    # the trainer's own preparation (training_data) for a model of this context: the same cache folder
    data = prepare_dataset(dataset, tokenizer, data_dir, val_fraction=val_fraction,
                           block_size=max(block_size, HELD_OUT_WINDOW))
    loader = PackedLoader(data.val_shards if split == "val" else data.train_shards, data.dtype, 1, block_size,
                          shuffle=False)
    n_windows = loader.n_chunks if not max_tokens else min(loader.n_chunks, -(-max_tokens // block_size))
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer, model.config.vocab_size),
                                device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        nats, text_nats, n_bytes = _score_windows(model, loader, n_windows, byte_lengths, batch_size,
                                                  f"evaluating {dataset} ({split})")
    finally:
        model.train(was_training)
    if not n_bytes.sum():
        raise UserError(f"the {split} split of {dataset} holds only special tokens: evaluate on text")
    tokens = n_windows * block_size
    loss = float(nats.sum() / tokens)
    loss_stderr = _stderr_of_mean(nats / block_size)
    perplexity = math.exp(loss)
    bits = text_nats / math.log(2)
    return {
        "dataset": dataset, "split": split,
        "loss": loss, "loss_stderr": loss_stderr,
        # the delta method: d exp(loss) = exp(loss) d loss
        "perplexity": perplexity, "perplexity_stderr": None if loss_stderr is None else perplexity * loss_stderr,
        "bpb": float(bits.sum() / n_bytes.sum()), "bpb_stderr": _stderr_of_ratio(bits, n_bytes),
        "tokens": tokens, "bytes": int(n_bytes.sum()), "windows": n_windows, "block_size": block_size,
    }
