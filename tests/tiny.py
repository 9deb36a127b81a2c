"""The one tiny-net configuration every test shares: width 1/16 (conv widths 3-16) at
each net's smallest input, so a step runs in milliseconds on the CPU."""

from alexnet2gpu import smallest_image_size

TINY_WIDTH = 1 / 16
TINY_SIZE = {name: smallest_image_size(name) for name in ("dual", "half", "simplified", "torchvision")}
TINY = {"width": TINY_WIDTH, "image_size": TINY_SIZE["dual"]}  # dual: 64 px
TINY_ARGS = ["--width", str(TINY_WIDTH), "--image-size", str(TINY_SIZE["dual"])]


def tiny(model: str) -> dict:
    """build_model keywords for the tiny version of ``model``."""
    return {"width": TINY_WIDTH, "image_size": TINY_SIZE[model]}


def tiny_args(model: str) -> list[str]:
    """Command-line flags for the tiny version of ``model``."""
    return ["--model", model, "--width", str(TINY_WIDTH), "--image-size", str(TINY_SIZE[model])]
