"""Initialisations: the paper's (section 5), the released config's, and d2l's Xavier.

Sources: [paper] section 5; [cfg] computerhistory/AlexNet-Source-Code,
layers/layers-145.cfg (``initW``); [d2l] 8.1 ``init_cnn``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["INITS", "init_cfg_", "init_paper_", "init_xavier_", "initialise_"]

# [paper] section 5: biases 1 in conv2, conv4, conv5 and the hidden fully connected layers.
_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")
# [cfg] layers-145.cfg: initW=0.03 in conv3, conv4 and conv5, 0.01 elsewhere.
_CFG_STD = {"conv3": 0.03, "conv4": 0.03, "conv5": 0.03}


# The paper's layer names, in the order the layers run.
_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def _paper_layer_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each conv and linear module with the paper's name of its layer: its own name where
    the net uses the paper's (dual, half, simplified: both towers' conv1 are "conv1"),
    else its place in order (torchvision's ``features.0`` ... ``classifier.6``)."""
    found = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if all(name in _LAYERS for name, _ in found):
        return found
    if len(found) == len(_LAYERS):
        return [(layer, m) for layer, (_, m) in zip(_LAYERS, found)]
    raise ValueError(f"cannot tell the paper's layers in {type(model).__name__}: {len(found)} conv/linear modules")


def _init_gaussian_(model: nn.Module, std_of: dict[str, float]) -> None:
    for layer, module in _paper_layer_names(model):
        nn.init.normal_(module.weight, 0.0, std_of.get(layer, 0.01))
        nn.init.constant_(module.bias, 1.0 if layer in _BIAS_ONE else 0.0)


def init_paper_(model: nn.Module) -> None:
    """[paper] section 5: weights from N(0, 0.01); biases 1 in conv2, conv4, conv5 and the
    hidden fully connected layers (fc6, fc7), 0 elsewhere."""
    _init_gaussian_(model, {})


def init_cfg_(model: nn.Module) -> None:
    """The released code's [cfg]: as the paper, but std 0.03 in conv3-conv5."""
    _init_gaussian_(model, _CFG_STD)


def init_xavier_(model: nn.Module) -> None:
    """[d2l] ``init_cnn``: Xavier-uniform weights, PyTorch's default biases (reset here too,
    so that a net first given the paper's biases of 1 ends up as d2l's would)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
            nn.init.xavier_uniform_(module.weight)


INITS = {"paper": init_paper_, "cfg": init_cfg_, "xavier": init_xavier_}


def initialise_(model: nn.Module, init: str) -> None:
    """Applies the initialisation named ``init`` (one of :data:`INITS`)."""
    INITS[init](model)
