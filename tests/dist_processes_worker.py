"""Worker for tests/test_replicas_hybrid.py, run under torchrun (gloo, CPU): one training
step of each (placement, net, global batch) asked for, checked against the single-process
float64 reference (:func:`alexnet2gpu.checks.verify_processes.run_checks`), and (with
``--checkpoint``) a hybrid checkpoint's round trip to one device and back. Rank 0 writes
the records as JSON."""

import argparse
import json
import sys

import torch
import torch.distributed as dist

from alexnet2gpu import build_model, place
from alexnet2gpu.checks.verify_processes import run_checks
from alexnet2gpu.models import init_xavier_, smallest_image_size
from alexnet2gpu.parallel import close_distributed, full_state_dict, load_full_state_dict


def checkpoint_round_trip(model_name: str) -> dict:
    """A hybrid net's full state dict against the single-device net's, and back: the
    hybrid's logits after loading a single-device state equal that net's."""
    size = smallest_image_size(model_name)
    torch.manual_seed(1)
    single = build_model(model_name, image_size=size, width=1 / 16, num_classes=10, dropout=0.0)
    init_xavier_(single)
    torch.manual_seed(2)
    other = build_model(model_name, image_size=size, width=1 / 16, num_classes=10, dropout=0.0)
    placed = place(other, "hybrid", devices="cpu")
    saved = full_state_dict(placed)  # what a hybrid checkpoint holds
    fresh = build_model(model_name, image_size=size, width=1 / 16, num_classes=10, dropout=0.0)
    fresh.load_state_dict(saved)  # ... loads on one device as it is
    keys_same = list(saved) == list(single.state_dict())
    plain = all(type(v) is torch.Tensor for v in saved.values())
    load_full_state_dict(placed, single.state_dict())  # a one-device checkpoint into hybrid
    back = full_state_dict(placed)
    x = torch.randn(4, single.in_channels, size, size, generator=torch.Generator().manual_seed(3))
    rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    placed.eval()
    single.eval()
    with torch.no_grad():
        diff = float((placed(x[rows]) - single(x)[rows]).abs().max())
    placed.release_groups()
    return {
        "model": model_name,
        "keys_same": keys_same,
        "plain_tensors": plain,
        "loaded_equal": all(torch.equal(back[k], v) for k, v in single.state_dict().items()),
        "saved_equal": all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items()),
        "logits_max_diff": diff,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--check", action="append", default=[], help="placement:model:batch, repeatable")
    p.add_argument("--count", action="append", default=[], help="placement:model:batch at full size, bytes only")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--checkpoint", action="append", default=[], help="a net for the hybrid round trip")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        trips = [checkpoint_round_trip(name) for name in args.checkpoint]
    except BaseException:
        close_distributed()
        raise
    rank = dist.get_rank()
    result = run_checks(
        [spec.split(":") for spec in args.check], [spec.split(":") for spec in args.count], num_classes=args.num_classes
    )  # leaves the process group
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({**result, "checkpoints": trips}, f)


if __name__ == "__main__":
    sys.exit(main())
