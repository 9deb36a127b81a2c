"""The largest training batch that fits, per card, for every model x placement x precision
that applies, with the device that binds and each device's memory at that batch (weights,
gradients, momentum, activations, input, weight casts, reserve). Planned without a GPU:
each configuration's step is accounted once under FakeTensorMode at two batch sizes and
solved as fixed + per image x batch. The reserve for the CUDA context and workspaces is
measured on CUDA when there is one, else a stated default (--reserve sets it). The
estimate leaves temporaries out: --temporaries makes one-device placements fit torch's
MemTracker peak over the step as well (slower). Sizes: GB is 10**9 bytes, GiB 2**30;
NVIDIA's "16 GB" cards hold 16 GiB."""

from __future__ import annotations

import argparse
import difflib

from ..errors import Alexnet2gpuError, ConfigError
from ..measure.cards import CARD_NAMES, parse_size
from ..models.names import MODEL_NAMES
from ..parallel.names import PRECISIONS, TWO_TOWER_PLACEMENTS


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _names(known: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise argparse.ArgumentTypeError(f"unknown {what} '{name}': choose from {', '.join(known)}{hint}")
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given: choose from {', '.join(known)}")
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--memory", type=_size, metavar="SIZE", help="a device memory, e.g. 3GiB, 16GB, 500MiB")
    where.add_argument(
        "--card",
        type=_names(CARD_NAMES, "card"),
        metavar="NAMES",
        help=f"cards, comma-separated: {', '.join(CARD_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--model",
        type=_names(MODEL_NAMES, "model"),
        metavar="NAMES",
        help=f"nets, of {', '.join(MODEL_NAMES)} (default: all)",
    )
    placements = (*TWO_TOWER_PLACEMENTS, "single")
    parser.add_argument(
        "--placement",
        type=_names(placements, "placement"),
        metavar="NAMES",
        help=f"placements, of {', '.join(placements)} (default: all that apply)",
    )
    parser.add_argument(
        "--precision",
        type=_names(PRECISIONS, "precision"),
        metavar="NAMES",
        help=f"precisions, of {', '.join(PRECISIONS)} (default: all)",
    )
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the nets (default: 1)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: each net's own)")
    parser.add_argument(
        "--reserve",
        type=_size,
        metavar="SIZE",
        help="memory kept off every device for the CUDA context and workspaces (default: measured on "
        "CUDA, else 512 MiB context + 256 MiB workspaces, an assumption)",
    )
    parser.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print each device's memory at the largest batch (default: with one or two cards)",
    )
    parser.add_argument(
        "--temporaries",
        action="store_true",
        help="one-device placements must also fit the step's peak with temporaries (torch's MemTracker, "
        "at batch 64 and 128; slower: about 4 s more per configuration)",
    )
    parser.add_argument(
        "--check-boundary",
        action="store_true",
        help="estimate each step directly at the predicted batch and one above (any machine; slower)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="CUDA only: run the real step at the predicted batch and one above, the allocator capped at the "
        "card (every row: narrow it with --card/--memory, --model, --placement, --precision)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="write the plan as JSON ('-' for stdout)")
    parser.add_argument("--md", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument("--png", metavar="PATH", help="plot the largest batches, grouped by card")


def _reserve(args: argparse.Namespace):
    import torch

    from ..measure.fit import Reserve, default_reserve, measure_reserve

    if args.reserve is not None:
        return Reserve(args.reserve, args.reserve, 0, "given (--reserve)")
    return measure_reserve("cuda:0") if torch.cuda.is_available() else default_reserve()


def run(args: argparse.Namespace) -> int:
    import torch

    from ..measure.cards import CARDS, Card
    from ..measure.fit import check_boundary, plan_fit
    from ..measure.fitcheck import check_on_cuda
    from ..parallel import set_cpu_threads

    if args.check and not torch.cuda.is_available():
        raise ConfigError(
            "--check runs the step on CUDA and this machine has no CUDA device (--check-boundary estimates it)"
        )
    set_cpu_threads(args.threads)
    if args.memory is not None:
        cards = [Card("memory", f"{args.memory / 2**30:.2f} GiB", args.memory, f"{args.memory:,} bytes", "--memory")]
    else:
        cards = [CARDS[name] for name in (args.card or CARDS)]
    kwargs = {"width": args.width} if args.width != 1.0 else {}
    if args.image_size:
        kwargs["image_size"] = args.image_size
    plan = plan_fit(
        cards,
        args.model,
        args.placement,
        args.precision,
        reserve=_reserve(args),
        temporaries=args.temporaries,
        **kwargs,
    )
    for row in plan.rows:
        if args.check_boundary:
            row.check = check_boundary(row, plan.reserve, **kwargs)
        if args.check:
            row.check = check_on_cuda(row, plan.reserve, **kwargs)
    from ..report import write_json, write_text_atomic
    from ..report.fit import fit_markdown, plot_fit, render_fit

    if args.json != "-":
        render_fit(plan, breakdown=args.breakdown if args.breakdown is not None else len(cards) <= 2)
    try:
        if args.json:
            write_json(args.json, plan.to_json())
        if args.md:
            write_text_atomic(args.md, fit_markdown(plan))
        if args.png:
            plot_fit(plan, args.png)
    except OSError as error:
        raise Alexnet2gpuError(f"could not write {error.filename}: {error.strerror or error}") from None
    return 0
