"""`cnnlab explain RUN IMAGE`: Grad-CAM and saliency of a prediction; feature maps; filters."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = (
    "cnnlab explain runs/train shoe.png\n"
    "  cnnlab explain runs/train shoe.png --target Sandal\n"
    "  cnnlab explain runs/train shoe.png --feature-maps --filters --out explained"
)


def cmd_explain(args: argparse.Namespace) -> int:
    from cnnlab.cli import out
    from cnnlab.explain import explain_file

    result = explain_file(
        args.run,
        args.image,
        target=args.target,
        top_k=args.top_k,
        out_dir=args.out,
        show_feature_maps=args.feature_maps,
        show_filters=args.filters,
    )
    e = result.explanation
    out(args.image)
    for rank, (name, probability) in enumerate(e.top, 1):
        out(f"  {rank}. {name:<24} {probability:7.2%}")
    out(f"{e.method} (layer {e.layer}) and saliency explain class '{e.target_name}'.")
    for path in result.files:
        out(f"  {path}")
    out(f"Results saved to {result.files[0].parent}")
    return 0


def register(command: Any) -> None:
    p = command(
        "explain",
        "Grad-CAM and saliency for one image; --feature-maps, --filters",
        cmd_explain,
    )
    p.epilog = "examples:\n  " + EXAMPLES
    p.add_argument("run", help="run folder, e.g. runs/train")
    p.add_argument("image", help="an image file (decoded like `cnnlab predict` does)")
    p.add_argument("--target", help="class name or index to explain (default: the predicted one)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--feature-maps", action="store_true", help="also show every Conv2D layer's activations"
    )
    p.add_argument("--filters", action="store_true", help="also show the first layer's kernels")
    p.add_argument("--out", help="output folder (default: RUN/explain)")
