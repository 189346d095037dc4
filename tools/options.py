"""Command-line argument types and the argument groups several commands share."""
from __future__ import annotations

import argparse
import json


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_options(items: list[str]) -> dict:
    """--option name=value (JSON values: 0.5, 4, [1,3,5], "last"; bare words are strings)."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r} is not of the form name=value, e.g. lam=0.5")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key] = tuple(value) if isinstance(value, list) else value
    return options


def csv_list(text: str, kind) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None


def method_options(spec, method: str, cli_options: dict) -> dict:
    """A method's options: the model's calibrated defaults, then the command line's."""
    return {**spec.method_defaults.get(method, {}), **cli_options}


def add_model_args(p: argparse.ArgumentParser, model: str = "tiny-llava-ov") -> None:
    p.add_argument("--model", default=model, help=f"preset name: ovqa-small, tiny-llava-ov, llava-ov-0.5b, llava-ov-7b "
                                                  f"(default {model})")
    p.add_argument("--grid", default=None, help="crop grid RxC beside the base crop (default: the preset's)")
    p.add_argument("--model-path", default=None, help="checkpoint directory (else the HF cache)")
    p.add_argument("--random-weights", action="store_true", help="real-size architecture, random weights")
    p.add_argument("--budget", type=positive_int, default=None, help="visual tokens kept (default: the preset's)")


def add_scene_args(p: argparse.ArgumentParser, images: int) -> None:
    p.add_argument("--prompt", default="What colour is the largest shape?")
    p.add_argument("--images", type=positive_int, default=images, help="seeded synthetic demo scenes")


def load_model(args):
    """The preset named by the model arguments, and its pruned forward."""
    from iwp.model import PrunedLlavaOnevision
    from iwp.zoo import load
    loaded = load(args.model, grid=args.grid, model_path=args.model_path, random_weights=args.random_weights)
    return loaded, PrunedLlavaOnevision(loaded.model)


def demo_batch(loaded, args):
    """`args.images` seeded demo scenes, each with `args.prompt`."""
    from iwp.demo import demo_image
    from iwp.inputs import make_batch
    size = loaded.resolution[::-1]
    images = [demo_image(seed, size) for seed in range(args.images)]
    return make_batch(loaded, images, [args.prompt] * args.images)
