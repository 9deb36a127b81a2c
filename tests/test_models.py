"""The nets themselves: parameter counts pinned to DESIGN.md, shapes, sizes, init."""

import pytest
import torch

from alexnet2gpu import MODEL_NAMES, ConfigError, build_model, smallest_image_size

# The seed's printout (d2l 8.1): simplified's output shapes for a 1x1x224x224 input, the
# ReLU and dropout layers left out.
SEED_SHAPES = [
    [1, 96, 54, 54],
    [1, 96, 26, 26],
    [1, 256, 26, 26],
    [1, 256, 12, 12],
    [1, 384, 12, 12],
    [1, 384, 12, 12],
    [1, 256, 12, 12],
    [1, 256, 5, 5],
    [1, 6400],
    [1, 4096],
    [1, 4096],
    [1, 10],
]


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [("dual", 60_965_224), ("simplified", 46_764_746), ("half", 59_798_312), ("torchvision", 61_100_840)],
)
def test_parameter_counts(name, expected):
    with torch.device("meta"):
        model = build_model(name)
    assert n_params(model) == expected


def test_dual_parameters_per_device_side():
    with torch.device("meta"):
        model = build_model("dual")
    device0 = n_params(model.tower_a) + n_params(model.fc8)
    assert (device0, n_params(model.tower_b)) == (32_531_112, 28_434_112)


def test_dual_shapes_match_caffe_grouped_layout():
    from alexnet2gpu import to_grouped_state_dict

    with torch.device("meta"):
        model = build_model("dual")
    shapes = {k: list(v.shape) for k, v in to_grouped_state_dict(model.state_dict()).items() if k.endswith("weight")}
    assert shapes == {
        "conv1.weight": [96, 3, 11, 11],
        "conv2.weight": [256, 48, 5, 5],
        "conv3.weight": [384, 256, 3, 3],
        "conv4.weight": [384, 192, 3, 3],
        "conv5.weight": [256, 192, 3, 3],
        "fc6.weight": [4096, 9216],
        "fc7.weight": [4096, 4096],
        "fc8.weight": [1000, 4096],
    }


def test_simplified_layer_shapes_are_the_seeds():
    model = build_model("simplified").eval()
    x = torch.zeros(1, 1, 224, 224)
    shapes = []
    for layer in model:
        x = layer(x)
        if not isinstance(layer, (torch.nn.ReLU, torch.nn.Dropout)):
            shapes.append(list(x.shape))
    assert shapes == SEED_SHAPES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_takes_the_common_arguments(name):
    size = smallest_image_size(name)
    model = build_model(name, in_channels=2, num_classes=7, image_size=size, width=1 / 16, dropout=0.25).eval()
    assert model(torch.randn(3, 2, size, size)).shape == (3, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_too_small_input_names_the_smallest_size(name):
    smallest = smallest_image_size(name)
    with pytest.raises(ValueError, match=f"smallest that works is {smallest}"):
        build_model(name, image_size=smallest - 1)


def test_wrong_input_shape_is_a_clear_error(tiny_dual):
    with pytest.raises(ValueError, match=r"expected a batch of shape \[N, 3, 64, 64\]"):
        tiny_dual(torch.randn(2, 3, 65, 65))


def test_224_input_is_padded_like_the_released_code():
    """cuda-convnet let conv1's last window run 3 pixels off a 224 image: 55x55 out."""
    with torch.device("meta"):
        at_224, at_227 = build_model("dual", image_size=224), build_model("dual", image_size=227)
    assert at_224.tower_a.pad1.pad == 3 and at_227.tower_a.pad1.pad == 0
    assert n_params(at_224) == n_params(at_227)


def test_paper_initialisation():
    model = build_model("dual")
    a = model.tower_a
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(getattr(a, name).bias == 1), name
    for layer in (a.conv1, a.conv3, model.fc8):
        assert torch.all(layer.bias == 0)
    assert abs(a.fc6.weight.std().item() - 0.01) < 5e-4
    assert abs(a.fc6.weight.mean().item()) < 5e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 0}, "width must be positive"),
        ({"num_classes": 0}, "num_classes must be at least 1"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model("dual", **kwargs)


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model 'vgg': choose one of dual"):
        build_model("vgg")


def test_xavier_init_resets_the_paper_biases():
    from alexnet2gpu.models import init_xavier_

    model = build_model("dual", **{"width": 1 / 16, "image_size": 64})
    init_xavier_(model)
    fc6 = model.tower_a.fc6
    bound = fc6.in_features**-0.5  # nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert fc6.bias.abs().max() <= bound and fc6.bias.abs().max() > 0
