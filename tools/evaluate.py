"""`iwp eval` (accuracy per method x budget, through PyTorch and optionally through engines) and
`iwp ovqa-export` (an OVQA split as the JSONL + PNG files `--data` reads)."""
from __future__ import annotations

from pathlib import Path

from .options import csv_list, method_options, parse_options


def method_options_for(spec, methods, items: list[str]) -> dict:
    """Per-method options: the model's calibrated defaults, then --option method.name=value."""
    overrides: dict = {}
    for item in items:
        name, dot, rest = item.partition(".")
        if not dot:
            raise ValueError(f"--option {item!r} must name its method, e.g. iwp.lam=0.5")
        overrides.setdefault(name, []).append(rest)
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise ValueError(f"--option names method(s) {unknown} that are not evaluated; evaluated: {', '.join(methods)}")
    return {m: method_options(spec, m, parse_options(overrides.get(m, []))) for m in methods if m != "none"}


def command(args) -> None:
    from iwp.calibration.evaluate import budgets_from_fractions, jsonl_items, ovqa_items, sweep
    from iwp.zoo import load

    from .engine_agreement import engine_agreement
    from .eval_report import markdown, write

    items = jsonl_items(args.data, args.prompt_suffix) if args.data else ovqa_items(args.split, args.examples)
    loaded = load(args.model, grid=args.grid, model_path=args.model_path, random_weights=args.random_weights)
    budgets = (sorted(set(csv_list(args.budgets, int))) if args.budgets
               else budgets_from_fractions(csv_list(args.fractions, float), loaded.n_visual))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = method_options_for(loaded.spec, methods, args.option)
    report = sweep(loaded, items, methods, budgets, options, args.metric, args.batch_size,
                   progress=lambda line: print(line, flush=True))
    report["items"] = str(args.data) if args.data else f"OVQA {args.split}"
    engine_items = items[: args.engine_examples]
    report["engines"] = [engine_agreement(e, loaded, engine_items, args.metric, lambda line: print(line, flush=True))
                         for e in args.engine]
    source = Path(args.data).stem if args.data else f"ovqa-{args.split}"
    out = write(report, Path(args.out) / f"{loaded.spec.name}-{loaded.spec.grid_name}-{source}")
    print(markdown(report))
    print(f"report    {out}/eval.json, eval.md, eval.png")


def ovqa_export_command(args) -> None:
    from iwp.calibration.ovqa import export_jsonl
    path = export_jsonl(args.split, args.examples, Path(args.out))
    print(f"wrote     {path} ({args.examples} questions, images beside it)")
