"""The `iwp` command line. Each Makefile target calls one subcommand; errors are one line on stderr, exit 2.

    iwp engine        build an engine directory (ONNX graphs + manifest), then one smoke generation
    iwp run           generate from an engine directory, streaming tokens
    iwp compare       fidelity table of several methods against the unpruned model
    iwp calibrate     BTP stage layers from adjacent-layer hidden-state change
    iwp ablate        IWP's open choices, one at a time around the defaults
    iwp bench-select  IWP selection time on CPU
    iwp bench         prefill speedup of every method x budget against unpruned, with the FLOP-ideal (ONNX Runtime)
    iwp bench-cuda    VisualTokenSelect CUDA kernel times (GPU)
    iwp profile       per-stage latency, memory and the FLOP-ideal ratio of an engine (JSON, Markdown, PNG)
    iwp compare-trt   an engine's TensorRT plans against ONNX Runtime
    iwp train         train ovqa-small on the OVQA benchmark (CPU, two stages of about 70 minutes)
    iwp eval          visual-QA accuracy per method x budget (OVQA or a JSONL benchmark), JSON/Markdown/PNG
    iwp ovqa-export   an OVQA split as a JSONL file and PNG images (the format `iwp eval --data` reads)
    iwp prepare       token ids and pixel values of one image and prompt, for the C++ app iwp_generate
"""
from __future__ import annotations

import argparse
import sys

from .options import add_model_args, add_scene_args, positive_int


def command(module: str, function: str = "command"):
    """A subcommand's body, imported only when that subcommand runs (so `iwp --help` imports no torch)."""
    def run(args) -> None:
        import importlib
        getattr(importlib.import_module(f"iwp.tools.{module}"), function)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    from iwp.export.spec import DTYPE_NAMES

    from .build import spec_default
    parser = argparse.ArgumentParser(prog="iwp", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("engine", help="build an engine directory and smoke-test it")
    add_model_args(p, model="ovqa-small")
    p.add_argument("--method", default="iwp", help="iwp, btp, transprune, fastv, dart, divprune, random, none")
    p.add_argument("--option", action="append", default=[], help="method option name=value, repeatable")
    p.add_argument("--image", default=None, help="smoke-test image (default: ovqa-small answers an OVQA test "
                                                  "question about its scene; other models a synthetic demo scene)")
    p.add_argument("--prompt", default=None, help='(default: the OVQA question, or "What is in the image?")')
    # None: EngineSpec's default (export/engine.py), the one home of every build default
    p.add_argument("--max-text-tokens", type=positive_int, default=None,
                   help=f"prompt tokens beside the image (default {spec_default('max_text_tokens')})")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"(default {spec_default('max_new_tokens')})")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help=f"(default {spec_default('dtype')})")
    p.add_argument("--select", default=None, choices=["plugin", "native"], help=f"(default {spec_default('select')})")
    # no choices=: EngineSpec refuses a bad value in one line that says what to pass
    p.add_argument("--quant", default=None, help=f"weight-only: none, int8 (per channel), int4 (block 128) "
                                                 f"(default {spec_default('quant')})")
    p.add_argument("--backend", default=spec_default("backend"), choices=["onnxruntime", "tensorrt", "auto"],
                   help="tensorrt also builds a .plan per graph; auto picks it when TensorRT is present")
    p.add_argument("--trt-workspace-gb", type=float, default=None,
                   help="cap on the TensorRT builder's tactic workspace, GiB (default: TensorRT's)")
    p.add_argument("--out", default="engines", help="directory that holds engine directories")
    p.set_defaults(func=command("build"))

    p = sub.add_parser("compare-trt", help="each TensorRT plan of an engine against ONNX Runtime, same inputs")
    p.add_argument("engine", help="an engine directory built with --backend tensorrt")
    p.add_argument("--image", default=None)
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--atol", type=float, default=None, help="float tolerance (default 1e-3 fp32, 2e-2 fp16)")
    p.set_defaults(func=command("compare_trt"))

    p = sub.add_parser("run", help="generate from an engine directory, streaming tokens")
    p.add_argument("--engine", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--budget", type=positive_int, default=None, help="refuse an engine built for another budget")
    p.add_argument("--method", default=None, help="refuse an engine built for another method")
    p.add_argument("--option", action="append", default=[],
                   help="name=value: refuse an engine built with another value of this option (repeatable)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=command("run"))

    p = sub.add_parser("compare", help="fidelity of methods against unpruned")
    add_model_args(p)
    p.add_argument("--methods", default="iwp,btp,transprune,fastv,dart,divprune,random")
    add_scene_args(p, images=4)
    p.set_defaults(func=command("compare"))

    p = sub.add_parser("calibrate", help="choose BTP stage layers and IWP options on the OVQA calibration split")
    add_model_args(p)
    p.set_defaults(model="ovqa-small")
    p.add_argument("--methods", default="btp,iwp", help="btp, iwp or both")
    p.add_argument("--stages", type=positive_int, default=3, help="BTP stages")
    p.add_argument("--examples", type=positive_int, default=300, help="OVQA calibration questions")
    p.add_argument("--fractions", default="0.05,0.1,0.25", help="budgets (fractions of N) IWP is scored at")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--write-defaults", action="store_true",
                   help="write the chosen values into the bundled model's method_defaults.json")
    p.add_argument("--out", default="calibrations", help="the sweep goes to OUT/<model>-<grid>/")
    p.set_defaults(func=command("calibrate"))

    p = sub.add_parser("ablate", help="IWP's options one at a time around the defaults")
    add_model_args(p)
    add_scene_args(p, images=8)
    p.set_defaults(func=command("ablate"))

    p = sub.add_parser("bench-prefill", help="vision and prefill time of engines; the first is the baseline")
    p.add_argument("--engine", action="append", required=True, help="engine directory, repeatable")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.set_defaults(func=command("bench_prefill"))

    p = sub.add_parser("bench-select", help="IWP selection time on CPU")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.set_defaults(func=command("bench_select"))

    p = sub.add_parser("profile", help="per-stage latency, memory and FLOP-ideal ratio of an engine")
    p.add_argument("--engine", required=True, help="the engine directory to profile")
    p.add_argument("--baseline", default=None, help="an unpruned engine (METHOD=none) for the measured speedup")
    p.add_argument("--image", default=None)
    p.add_argument("--prompt", default="What is in the image?")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument("--out", default="profiles", help="reports go to OUT/<engine name>/")
    p.set_defaults(func=command("profile"))

    p = sub.add_parser("soak", help="many generations in one process, watching memory")
    p.add_argument("--engine", required=True)
    p.add_argument("--generations", type=positive_int, default=1000)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.set_defaults(func=command("soak"))

    p = sub.add_parser("eval", help="visual-QA accuracy per method x budget")
    add_model_args(p)
    p.set_defaults(model="ovqa-small")
    p.add_argument("--methods", default="none,iwp,btp,transprune,fastv,dart,divprune,random")
    p.add_argument("--budgets", default=None, help="visual tokens kept, comma-separated (default: --fractions of N)")
    p.add_argument("--fractions", default="0.05,0.1,0.15,0.25,0.5", help="budgets as fractions of N")
    p.add_argument("--split", default="test", choices=["train", "calibration", "test"], help="OVQA split")
    p.add_argument("--examples", type=positive_int, default=500, help="OVQA questions")
    p.add_argument("--data", default=None, help="a JSONL VQA file instead of OVQA (the bridge for real checkpoints)")
    p.add_argument("--metric", default="exact", choices=["exact", "vqa"])
    p.add_argument("--prompt-suffix", default="", help="appended to every JSONL question, e.g. "
                   "'Answer the question using a single word or phrase.'")
    p.add_argument("--option", action="append", default=[], help="method option method.name=value, repeatable")
    p.add_argument("--engine", action="append", default=[], help="also answer through this ONNX Runtime engine "
                   "and compare with PyTorch (repeatable)")
    p.add_argument("--engine-examples", type=positive_int, default=100, help="questions run through each engine")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--out", default="evals", help="reports go to OUT/<model>-<grid>-<source>/")
    p.set_defaults(func=command("evaluate"))

    p = sub.add_parser("train", help="train ovqa-small on the OVQA train split, in three stages")
    p.add_argument("--stage", required=True, choices=["base", "polish", "lookup"],
                   help="base: the eye and the questions from the seed (about 70 min); polish: more questions "
                        "from the base's weights (about 70 min); lookup: the polish with the lookup's heads "
                        "from the polished weights (about 45 min)")
    p.add_argument("--start", default=None, help="the previous stage's directory (default: build/ovqa-small-base "
                                                 "for polish, build/ovqa-small-polish for lookup)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps of the stage's question phase (default: the recipe's)")
    p.add_argument("--batch", type=positive_int, default=None, help="images per step (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None, help="(default: the recipe's)")
    p.add_argument("--out", default=None, help="model directory (default: build/ovqa-small-base for base, "
                                               "build/ovqa-small-polish for polish, the bundled "
                                               "iwp/weights/ovqa-small for lookup)")
    p.set_defaults(func=command("train"))

    p = sub.add_parser("prepare", help="token ids and pixel values of one image and prompt, for the C++ app")
    p.add_argument("--engine", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="writes OUT.ids and OUT.pixels")
    p.set_defaults(func=command("run", "prepare_command"))

    p = sub.add_parser("ovqa-export", help="write an OVQA split as JSONL + PNG images")
    p.add_argument("--split", default="test", choices=["train", "calibration", "test"])
    p.add_argument("--examples", type=positive_int, default=500)
    p.add_argument("--out", default="ovqa-test", help="directory for questions.jsonl and images/")
    p.set_defaults(func=command("evaluate", "ovqa_export_command"))

    p = sub.add_parser("bench", help="prefill speedup of every method x budget against unpruned (ONNX Runtime)")
    p.add_argument("--model", default="llava-ov-0.5b")
    p.add_argument("--model-path", default=None)
    p.add_argument("--random-weights", action="store_true", help="real-size architecture, random weights")
    p.add_argument("--methods", default="none,iwp,btp,transprune,fastv,dart,divprune")
    p.add_argument("--budgets", default="64,128,256,576")
    p.add_argument("--grid", default=None, help="crop grid RxC (default: the preset's)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--device", default="cpu", help="torch backend: cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="torch backend's dtype")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="benchmarks", help="reports go to OUT/<model>-<grid>/")
    p.set_defaults(func=command("bench"))

    p = sub.add_parser("bench-cuda", help="VisualTokenSelect CUDA kernel times (needs a GPU)")
    p.add_argument("--repeats", type=positive_int, default=50)
    p.set_defaults(func=command("bench_cuda"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"iwp: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError) as err:  # e.g. --out is a file
        print(f"iwp: error: {err.filename}: {err.strerror}; pass a directory this user can write", file=sys.stderr)
        sys.exit(2)
