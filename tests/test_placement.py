"""One function, every placement: towers, grouped and split (on cpu,cpu) give the same
logits, loss and gradients; split on two CUDA devices is proven under FakeTensorMode."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from alexnet2gpu import (
    ConfigError,
    build_model,
    from_grouped_state_dict,
    place,
    seed_dropout,
    to_grouped_state_dict,
)
from alexnet2gpu.checks.verify import TOLERANCE, available_placements, check_placement, relative_error
from alexnet2gpu.models import init_xavier_
from alexnet2gpu.parallel import TWO_TOWER_PLACEMENTS, forward_loss
from alexnet2gpu.parallel import split as split_mod

from .close import assert_close_relative
from .conftest import TINY

PLACEMENTS = [("towers", "cpu"), ("grouped", "cpu"), ("split", "cpu,cpu")]


def run(placed, x, y, seed=7):
    seed_dropout(placed, seed)
    placed.train()
    logits = placed(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in placed.named_parameters()}


@pytest.fixture
def xavier_dual(tiny_dual):
    init_xavier_(tiny_dual)  # well-conditioned gradients (see verify.check_placement)
    return tiny_dual


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 64, 64, generator=g), torch.randint(0, 1000, (6,), generator=g)


@pytest.mark.parametrize("placement, devices", PLACEMENTS)
def test_placement_matches_float64_reference(placement, devices):
    check = check_placement(placement, devices, batch_size=6, seed=3)
    assert check.ok, check
    assert check.grads_rel_err < TOLERANCE and check.logits_rel_err < TOLERANCE


@pytest.mark.parametrize("placement, devices", PLACEMENTS[1:])
def test_placements_agree_in_float32_with_dropout(xavier_dual, batch, placement, devices):
    x, y = batch
    ref_logits, ref_loss, ref_grads = run(copy.deepcopy(xavier_dual), x, y)
    logits, loss, grads = run(place(copy.deepcopy(xavier_dual), placement, devices), x, y)
    assert_close_relative(logits, ref_logits, 1e-5)
    assert_close_relative(loss, ref_loss, 1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_relative(grads[name], ref_grads[name], 1e-5, msg=name)


def test_dropout_is_active_and_seeded(xavier_dual, batch):
    x, y = batch
    a, _, _ = run(copy.deepcopy(xavier_dual), x, y, seed=1)
    b, _, _ = run(copy.deepcopy(xavier_dual), x, y, seed=2)
    c, _, _ = run(copy.deepcopy(xavier_dual), x, y, seed=1)
    assert not torch.allclose(a, b)  # different seeds, different masks
    assert torch.equal(a, c)


def test_a_wrong_exchange_is_caught(xavier_dual, batch, monkeypatch):
    """The equivalence check can fail: swap the towers' order at exchange 1 in split."""
    x, y = batch
    ref_logits, _, _ = run(copy.deepcopy(xavier_dual), x, y)
    placed = place(copy.deepcopy(xavier_dual), "split", "cpu,cpu")
    real_send = split_mod._CopyExchange._send
    monkeypatch.setattr(split_mod._CopyExchange, "_send", lambda self, t, d: real_send(self, t.flip(1), d))
    logits, _, _ = run(placed, x, y)
    assert relative_error(logits, ref_logits) > 1e-3


@pytest.mark.parametrize("placement, devices", PLACEMENTS)
def test_state_dict_keys_are_the_same_in_every_placement(tiny_dual, placement, devices):
    keys = list(tiny_dual.state_dict())
    placed = place(copy.deepcopy(tiny_dual), placement, devices)
    assert list(placed.state_dict()) == keys
    placed.load_state_dict(tiny_dual.state_dict())


def test_grouped_state_dict_round_trip_is_lossless(tiny_dual):
    sd = tiny_dual.state_dict()
    grouped = to_grouped_state_dict(sd)
    assert list(grouped) == [
        f"{layer}.{p}"
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
        for p in ("weight", "bias")
    ]
    back = from_grouped_state_dict(grouped)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # tower a is group 0: the first half of the output channels
    assert torch.equal(grouped["conv2.weight"][: sd["tower_a.conv2.weight"].shape[0]], sd["tower_a.conv2.weight"])


def test_grouped_layout_is_caffes_function(xavier_dual, batch):
    """The converted weights in a plain groups=2 single-stream net, with LRN within each
    tower, give the two-tower net's logits: the layouts describe the same function."""
    x, _ = batch
    g = to_grouped_state_dict(xavier_dual.state_dict())
    net, a = xavier_dual.eval(), xavier_dual.tower_a

    def lrn(h):
        n, c, hh, ww = h.shape
        return F.local_response_norm(h.reshape(n * 2, c // 2, hh, ww), 5, 1e-4, 0.75, 2.0).reshape(n, c, hh, ww)

    padded = F.pad(x, (0, a.pad1.pad, 0, a.pad1.pad))  # cuda-convnet's conv1 edge (3 px at 64, 224)
    h = F.relu(F.conv2d(padded, g["conv1.weight"], g["conv1.bias"], stride=4))
    h = F.max_pool2d(lrn(h), 3, 2)
    h = F.max_pool2d(lrn(F.relu(F.conv2d(h, g["conv2.weight"], g["conv2.bias"], padding=2, groups=2))), 3, 2)
    h = F.relu(F.conv2d(h, g["conv3.weight"], g["conv3.bias"], padding=1))
    h = F.relu(F.conv2d(h, g["conv4.weight"], g["conv4.bias"], padding=1, groups=2))
    h = F.max_pool2d(F.relu(F.conv2d(h, g["conv5.weight"], g["conv5.bias"], padding=1, groups=2)), 3, 2)
    h = F.relu(F.linear(h.flatten(1), g["fc6.weight"], g["fc6.bias"]))
    h = F.relu(F.linear(h, g["fc7.weight"], g["fc7.bias"]))
    logits = F.linear(h, g["fc8.weight"], g["fc8.bias"])
    assert_close_relative(logits, net(x), 1e-5)


class CrossingLog(TorchDispatchMode):
    """Records every op whose output lies on another device than one of its inputs."""

    def __init__(self):
        super().__init__()
        self.crossings = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if isinstance(out, torch.Tensor):
            sources = {str(t.device) for t in inputs} - {str(out.device)}
            if sources:
                self.crossings.append((sources.pop(), str(out.device), list(out.shape)))
        return out


def plan_split(**kwargs):
    with torch.device("meta"):
        model = build_model("dual", **kwargs)
    return model


def test_split_on_two_cuda_devices_under_fake_tensors():
    model = plan_split(**TINY)
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(model, "split", ["cuda:0", "cuda:1"])
        for name, p in placed.named_parameters():
            expected = "cuda:1" if name.startswith("tower_b.") else "cuda:0"
            assert str(p.device) == expected, name
        x = torch.empty(2, 3, 64, 64, device="cuda:0")
        placed.train()  # dropout included
        with CrossingLog() as log:
            logits = placed(x)
        assert str(logits.device) == "cuda:0" and logits.shape == (2, 1000)
    # per-tower widths at 1/16: conv2 8, conv5 8, fc 128; at 64 px pool2 is 3x3, pool5 1x1
    c2, c5, fc = 8, 8, 128
    assert sorted(log.crossings) == sorted(
        [
            ("cuda:0", "cuda:1", [2, 3, 64, 64]),  # the image, to tower b
            ("cuda:1", "cuda:0", [2, c2, 3, 3]),
            ("cuda:0", "cuda:1", [2, c2, 3, 3]),  # exchange 1
            ("cuda:1", "cuda:0", [2, c5]),
            ("cuda:0", "cuda:1", [2, c5]),  # exchange 2
            ("cuda:1", "cuda:0", [2, fc]),
            ("cuda:0", "cuda:1", [2, fc]),  # exchange 3
            ("cuda:1", "cuda:0", [2, fc]),  # exchange 4, tower b's fc7 output to fc8
        ]
    )


def test_full_size_split_plans_without_hardware():
    model = plan_split()
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(model, "split", ["cuda:0", "cuda:1"])
        logits = placed(torch.empty(128, 3, 227, 227, device="cuda:0"))
    assert logits.shape == (128, 1000) and str(logits.device) == "cuda:0"


def test_a_missing_copy_raises_device_mismatch(monkeypatch):
    model = plan_split(**TINY)
    monkeypatch.setattr(split_mod._CopyExchange, "_send", lambda self, t, device: t)  # forget the copy
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(model, "split", ["cuda:0", "cuda:1"])
        # torch 2.13+ raises FakeTensorDeviceMismatchError (a RuntimeError); 2.11 a plain RuntimeError
        with pytest.raises(RuntimeError, match=r"two .*devices.*cuda:0.*cuda:1"):
            placed(torch.empty(2, 3, 64, 64, device="cuda:0"))


def test_split_counts_the_designs_bytes_per_image():
    """DESIGN.md section 3: 113,152 bytes each way + 8,192, forward and backward."""
    model = build_model("dual")
    placed = place(model, "split", "cpu,cpu")
    x, y = torch.randn(2, 3, 227, 227), torch.tensor([0, 1])
    forward_loss(placed, x, y).backward()
    assert placed.exchange_counter.bytes == 2 * 468_992
    assert placed.exchange_counter.transfers == 14  # 7 forward, 7 backward


def backward_by_hand(loss: torch.Tensor) -> None:
    """``loss.backward()`` without the autograd engine, for fake CUDA tensors on a machine
    without a GPU (there the engine asks the CUDA driver about the device and fails:
    "hasPrimaryContext expects a valid device index"). Each node runs once, after every
    node that feeds it a gradient (reverse post-order of the graph), and each gradient is
    summed to its input's shape, as the engine does; unlike the engine (which lets tensor
    subclasses through) every gradient must already be on its input's device."""
    order, seen = [], set()

    def visit(node):
        if node is not None and node not in seen:
            seen.add(node)
            for next_node, _ in node.next_functions:
                visit(next_node)
            order.append(node)

    visit(loss.grad_fn)
    pending = {loss.grad_fn: [torch.ones_like(loss)]}
    for node in reversed(order):
        grads = pending.pop(node)
        outputs = (node if callable(node) else node.apply)(*grads)  # custom Functions: apply
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for (next_node, slot), grad in zip(node.next_functions, outputs):
            if next_node is None or grad is None:
                continue
            expected = next_node._input_metadata[slot]
            assert grad.device == expected.device, (node.name(), grad.device, expected.device)
            inputs = pending.setdefault(next_node, [None] * len(next_node._input_metadata))
            grad = grad.sum_to_size(expected.shape)
            inputs[slot] = grad if inputs[slot] is None else inputs[slot] + grad


@pytest.mark.parametrize(
    "kwargs, bytes_per_image",
    [
        # at 1/16: exchange 1 8x3x3, 2 8, 3 128 values each way, 4 128 from b; float32
        (TINY, 2 * 4 * (2 * (8 * 3 * 3 + 8 + 128) + 128)),
        ({}, 468_992),  # DESIGN.md section 3, at full size
    ],
    ids=["tiny", "full-size"],
)
def test_split_across_one_gpu_and_the_cpu_under_fake_tensors(kwargs, bytes_per_image):
    """On a machine with one GPU, split on cuda:0,cpu is a real cross-device run: the
    forward, the loss on cuda:0 and the backward raise no device mismatch, every gradient
    lies on its parameter's device, and the counted bytes are the design's."""
    model, batch = plan_split(**kwargs), 2
    size = model.image_size
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(model, "split", ["cuda:0", "cpu"])
        assert {str(p.device) for p in placed.tower_b.parameters()} == {"cpu"}
        assert {str(p.device) for p in [*placed.tower_a.parameters(), *placed.fc8.parameters()]} == {"cuda:0"}
        x = torch.empty(batch, 3, size, size, device="cuda:0")
        y = torch.zeros(batch, dtype=torch.long, device="cuda:0")
        placed.train()  # dropout included
        loss = forward_loss(placed, x, y)
        assert str(loss.device) == "cuda:0"
        assert placed.exchange_counter.bytes == batch * bytes_per_image // 2  # the forward's half
        backward_by_hand(loss)
        for name, p in placed.named_parameters():
            assert p.grad is not None and p.grad.device == p.device and p.grad.shape == p.shape, name
    assert placed.exchange_counter.bytes == batch * bytes_per_image
    assert placed.exchange_counter.transfers == 14  # 7 forward, 7 backward


def test_a_gradient_left_on_the_wrong_device_is_caught(monkeypatch):
    """backward_by_hand can fail: a send whose backward forgets to copy the gradient back."""
    monkeypatch.setattr(split_mod._Send, "backward", staticmethod(lambda ctx, grad: (grad, None, None)))
    model = plan_split(**TINY)
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(model, "split", ["cuda:0", "cpu"])
        loss = forward_loss(placed, torch.empty(2, 3, 64, 64, device="cuda:0"), torch.zeros(2, dtype=torch.long))
        with pytest.raises(AssertionError, match="_SendBackward"):
            backward_by_hand(loss)


def test_auto_says_what_it_chose_and_why(tiny_dual, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    placed = place(tiny_dual, "auto")
    if torch.cuda.device_count() == 0:
        assert placed.layout.placement == "towers"  # measured faster than grouped on the CPU
        assert placed.layout.reason == "no CUDA device: both towers on the CPU (measured faster than grouped)"
    assert placed.layout.reason


def test_every_placement_this_machine_lists_runs_on_devices_it_has():
    """verify checks what available_placements lists: every single-process placement of
    the two-tower net, each on devices that place() accepts here."""
    listed = available_placements()
    assert {p for p, _ in listed} == set(TWO_TOWER_PLACEMENTS) - {"ranks"}
    for placement, devices in listed:
        placed = place(build_model("dual", **TINY), placement, devices)
        assert [str(d) for d in placed.layout.devices] == devices


GPUS = torch.cuda.device_count()


@pytest.mark.parametrize(
    "placement, devices, message",
    [
        pytest.param(
            "split",
            None,
            f"needs two CUDA devices and this machine has {GPUS}",
            marks=pytest.mark.skipif(GPUS >= 2, reason="split's default devices exist on this machine"),
        ),
        ("split", "cpu", "takes 2 device"),
        ("grouped", "cpu,cpu", "takes 1 device"),
        ("towers", "cuda:9", f"cuda:9 was requested but this machine has {GPUS} CUDA"),
        ("towers", "tpu", "'tpu' is not a device"),
        ("diagonal", None, "unknown placement 'diagonal'"),
    ],
)
def test_bad_placements_are_clear(tiny_dual, placement, devices, message):
    with pytest.raises(ConfigError, match=message):
        place(tiny_dual, placement, devices)


def test_single_stream_nets_take_one_device():
    model = build_model("simplified", width=1 / 16)
    assert place(model, "auto").layout.placement == "single"
    with pytest.raises(ConfigError, match="splits the two-tower net"):
        place(model, "split", "cpu,cpu")


@pytest.mark.parametrize("placement", ["towers", "grouped", "split"])
def test_every_placed_net_has_the_same_shape(placement):
    """Callers read these attributes and never probe: counters a placement lacks are None,
    and releasing the process groups of a one-process placement does nothing."""
    from alexnet2gpu import build_model, place

    devices = ["cpu", "cpu"] if placement == "split" else ["cpu"]
    placed = place(build_model("dual", width=1 / 16, image_size=67), placement, devices)
    assert placed.layout.placement == placement and placed.traffic is None
    assert (placed.exchange_counter is not None) == (placement == "split")
    assert placed.release_groups() is None
