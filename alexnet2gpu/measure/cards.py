"""GPU memory capacities for ``fit``, and sizes such as ``3GiB`` parsed; no torch (the
command line offers the names before it imports anything heavy).

GB or GiB: NVIDIA's datasheets give memory in "GB" meaning 2**30 bytes (DRAM comes in
binary sizes). The evidence: an A100 40GB reports 42,405,855,232 bytes to CUDA's
deviceQuery (a cluster's documentation, upb-pc2.atlassian.net, "NVIDIA A100 40GB with
NVLINK"), more than 40 * 10**9, and 0.51 GiB short of 40 GiB because the driver keeps a
little (ECC and its own structures); and the released AlexNet code's own deviceQuery.txt
(computerhistory/AlexNet-Source-Code) shows a 3 GB Fermi card of the paper's time, a Tesla
S2050, as "3072 MBytes (3220897792 bytes)", 327,680 bytes short of 3 GiB. So a card's
capacity here is its nominal size in GiB; what CUDA leaves the program is smaller, and
``fit`` takes it off through its reserve. On the command line, ``GB``/``MB`` are decimal
(10**9, 10**6) and ``GiB``/``MiB`` binary: say ``--memory 16GiB`` for a "16 GB" card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["CARDS", "CARD_NAMES", "Card", "format_size", "parse_size"]

GiB = 2**30


@dataclass(frozen=True)
class Card:
    name: str  # what --card takes
    label: str  # how tables show it
    capacity_bytes: int  # the nominal size, in bytes (GiB as the datasheet's "GB")
    stated: str  # as the datasheet states it
    source: str  # where the figure comes from


# Capacities as each vendor's datasheet states them. The NVIDIA datasheet addresses are
# cited as NVIDIA publishes them (this machine has no network: not fetched); the capacities
# agree with the third-party spec pages that were read (searched, not linked here).
CARDS = {
    card.name: card
    for card in (
        # The paper (section 3.2): "a single GTX 580 GPU has only 3GB of memory". NVIDIA's
        # reference GTX 580 has 1536 MB of GDDR5 (techpowerup.com/reviews/NVIDIA/GeForce_GTX_580:
        # "1.5 GB"; bit-tech.net's review: "GeForce GTX 580 1.5GB"); board makers sold 3072 MB
        # versions (grafikkartentest.net/nvidia-geforce-gtx-580: "einige Modelle auch mit 3.072
        # Megabyte"), the card the paper used.
        Card("gtx580-3gb", "GTX 580 3 GB", 3 * GiB, "3072 MB GDDR5 (board makers' 3 GB version)", "paper 3.2"),
        # Tesla V100 datasheet, images.nvidia.com/content/technologies/volta/pdf/
        # volta-v100-datasheet-update-us-1165301-r5.pdf: "32 GB /16 GB HBM2"; the PCIe product brief
        # PB-08744-001 (images.nvidia.com/content/tesla/pdf/Tesla-V100-PCIe-Product-Brief.pdf): 16 GB.
        Card("v100-16gb", "V100 16 GB", 16 * GiB, "16 GB HBM2", "NVIDIA V100 datasheet"),
        Card("v100-32gb", "V100 32 GB", 32 * GiB, "32 GB HBM2", "NVIDIA V100 datasheet"),
        # A100 datasheet, www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
        # nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf: 40GB HBM2, 80GB HBM2e.
        Card("a100-40gb", "A100 40 GB", 40 * GiB, "40 GB HBM2", "NVIDIA A100 datasheet"),
        Card("a100-80gb", "A100 80 GB", 80 * GiB, "80 GB HBM2e", "NVIDIA A100 datasheet"),
        # H100 datasheet, resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet:
        # H100 SXM and PCIe 80 GB (HBM3 / HBM2e).
        Card("h100-80gb", "H100 80 GB", 80 * GiB, "80 GB HBM3", "NVIDIA H100 datasheet"),
        # H200 datasheet, www.nvidia.com/en-us/data-center/h200/: "141GB of HBM3e" at 4.8 TB/s.
        Card("h200-141gb", "H200 141 GB", 141 * GiB, "141 GB HBM3e", "NVIDIA H200 datasheet"),
    )
}
CARD_NAMES = tuple(CARDS)

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``3GiB``, ``16GB``, ``500MiB``, ``1.5 GiB`` to bytes (GB decimal, GiB binary);
    anything else is refused with one line that says what would work."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(
            f"'{text}' is not a memory size: use a number and a unit, e.g. 3GiB, 16GB, 500MiB "
            "(GB = 10**9 bytes, GiB = 2**30)"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise ConfigError(f"memory size '{text}' is zero: give a positive size, e.g. 3GiB")
    return size


def format_size(n: int) -> str:
    """Bytes as GiB (two decimals) or MiB."""
    return f"{n / GiB:,.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:,.1f} MiB"
