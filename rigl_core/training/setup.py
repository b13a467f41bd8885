"""Device and process setup of a Trainer: which device and precision, seeding, the checks that data and
model fit each other, and (multi-device) the process group and the DDP/compile wrapping."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from rigl_core.training import distributed

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"training.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 on a CUDA device that supports it and fp32 elsewhere (CPU included); explicit
    fp32/bf16/fp16 are taken as asked, on CPU too (torch autocasts both dtypes there)."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_data_fits_model(spec, feed, task, num_classes: int) -> None:
    """The declared input shape matches the data's, and every label has a class."""
    data_shape = list(feed.input_shape)
    declared = spec.model.input_shape or (spec.model.architecture.input_shape if spec.model.architecture else None)
    if declared is not None and list(declared) != data_shape:
        field = "model.input_shape" if spec.model.input_shape else "model.architecture.input_shape"
        raise ValueError(f"{field}: {list(declared)} does not match the dataset's {data_shape}")
    if task.causal_lm:
        return  # the targets are the token ids, checked against the vocabulary once the model is built
    max_label = feed.max_label()
    if max_label >= num_classes:
        raise ValueError(f"model.num_classes: {num_classes} but the dataset has labels up to {max_label}")


def check_tokens_fit_model(spec, model: nn.Module, feed, task, input_shape, num_classes: int) -> int:
    """A token model needs int64 ids below its vocabulary; other models never get token ids. Returns the
    number of classes (a causal LM's is its vocabulary)."""
    vocab = getattr(model, "vocab_size", None)
    tokens = getattr(feed, "tokens", False)
    if vocab is None:
        if tokens:
            raise ValueError(f"dataset.x: int64 token ids, but {spec.model.name!r} takes float inputs "
                             "(give model.hf, or store x as float32)")
        return num_classes
    if not tokens or len(input_shape) != 1:
        raise ValueError(f"dataset.x: model.hf models take int64 token ids of shape (N, L), the data has "
                         f"samples of shape {list(input_shape)}{'' if tokens else ' that are not int64'}")
    if feed.max_token() >= vocab:
        raise ValueError(f"model.hf.vocab_size: {vocab} but the dataset has token ids up to {feed.max_token()}")
    return vocab if task.causal_lm else num_classes


def start_ranks(trainer) -> None:
    """Multi-device: form the process group (rank 0 starts the others; on several nodes, join the one the
    engine formed) and wrap the model in DDP.
    torch.compile wraps last, around DDP, as PyTorch recommends. Sets the trainer's `group` as soon as
    it exists (fit closes it whatever fails next) and `forward_model`, what training calls."""
    trainer.forward_model = trainer.model
    if trainer.world_size > 1:
        if trainer.gang is not None:  # an engine (Ray Train) started every rank and formed the group
            trainer.group = distributed.attach(trainer.gang)
        elif trainer.rank == 0:
            trainer.group = distributed.start(trainer.spec.model_dump_json(), trainer.world_size, trainer.device,
                                              trainer.resumed_from)
        else:
            trainer.group = distributed.join(trainer.rank, trainer.world_size, trainer.master_port, trainer.device)
        from torch.nn.parallel import DistributedDataParallel

        ids = [trainer.device.index] if trainer.device.type == "cuda" else None
        trainer.forward_model = DistributedDataParallel(trainer.model, device_ids=ids)
    if trainer.spec.training.compile:
        trainer.forward_model = torch.compile(trainer.forward_model)
