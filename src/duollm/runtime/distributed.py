"""Devices and processes: one place that turns a device name into a ``torch.device`` and joins the
process group when launched by ``torchrun`` (training and the oracle share it, DESIGN 4.6)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this call created the process group (the caller may destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; one line if unusable.
    Under torchrun ``auto`` and ``cuda`` take the process's own GPU (``LOCAL_RANK``)."""
    if not isinstance(name, str) or not DEVICE_NAMES.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps requested but MPS is not available")
    return torch.device(name)


def has_bf16_matrix_units(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run faster than float32 here: a CUDA GPU with bf16, or a CPU
    with AMX or AVX512-BF16 (read from ``/proc/cpuinfo``; other systems: no)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or not dist.is_available():
        return Dist()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)
