"""Worker for tests/test_ranks.py, run under torchrun: a few SGD steps of the dual net
under the `ranks` placement on synthetic batches; rank 0 saves the per-step losses, the
weights before and after, and the exchange bytes summed over all ranks."""

import argparse
import sys

import torch
import torch.distributed as dist

from alexnet2gpu import build_model, place, seed_dropout
from alexnet2gpu.data.synthetic import synthetic_batch
from alexnet2gpu.models import init_xavier_
from alexnet2gpu.parallel import close_distributed, forward_loss, full_state_dict


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--width", type=float, default=1 / 16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gather the weights before and after (slow at full width)",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = build_model("dual", width=args.width, image_size=args.image_size, num_classes=10, dropout=args.dropout)
    init_xavier_(model)  # larger gradients than N(0, 0.01), so a wrong gradient shows
    try:
        placed = place(model, "ranks", devices="cpu")
        seed_dropout(placed, args.seed, replica=placed.layout.replica)
        optimizer = torch.optim.SGD(placed.parameters(), lr=args.lr, momentum=0.9)
        before = full_state_dict(placed) if args.weights else {}
        losses = []
        for step in range(args.steps):
            x, y = synthetic_batch(
                args.seed,
                step,
                args.batch_size,
                in_channels=3,
                image_size=args.image_size,
                num_classes=10,
                dp_size=placed.layout.dp_size,
                dp_rank=placed.layout.replica,
            )
            loss = forward_loss(placed, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.detach().clone() if placed.is_loss_rank else torch.zeros(())
            dist.all_reduce(value)
            losses.append(float(value) / placed.layout.dp_size)
        after = full_state_dict(placed) if args.weights else {}
        sent = torch.tensor(
            [placed.exchange_counter.bytes, placed.exchange_counter.bytes * (placed.tower_rank == 0)],
            dtype=torch.float64,
        )
        dist.all_reduce(sent)
        if dist.get_rank() == 0:
            torch.save(
                {
                    "losses": losses,
                    "before": before,
                    "after": after,
                    "exchange_bytes": int(sent[0]),
                    "exchange_bytes_tower0": int(sent[1]),
                    "world_size": dist.get_world_size(),
                    "parameters_here": sum(p.numel() for p in placed.parameters()),
                },
                args.out,
            )
    except BaseException:
        close_distributed()
        raise
    close_distributed(barrier=True)


if __name__ == "__main__":
    sys.exit(main())
