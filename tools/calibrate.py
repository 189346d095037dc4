"""`iwp calibrate`: BTP's stage layers and IWP's options on the OVQA calibration split; `--write-defaults` puts
them beside the bundled model's weights."""
from __future__ import annotations

import json
from pathlib import Path

from .options import csv_list


def command(args) -> None:
    from iwp.atomic import staged_directory, write_file
    from iwp.calibration.calibrate import calibrate, markdown
    from iwp.calibration.evaluate import budgets_from_fractions, ovqa_items
    from iwp.zoo import METHOD_DEFAULTS, bundled_dir, load

    loaded = load(args.model, grid=args.grid, model_path=args.model_path, random_weights=args.random_weights)
    if args.write_defaults and not loaded.spec.bundled:
        raise ValueError(f"--write-defaults writes a bundled model's defaults; {loaded.spec.name} is not bundled, "
                         f"so pass the printed values as --option instead")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"btp", "iwp"})
    if unknown:
        raise ValueError(f"calibrate knows btp and iwp, not {unknown}")
    items = ovqa_items("calibration", args.examples)
    budgets = budgets_from_fractions(csv_list(args.fractions, float), loaded.n_visual)
    result = calibrate(loaded, items, methods, args.stages, budgets, batch_size=args.batch_size,
                       progress=lambda line: print(line, flush=True))
    text = markdown(result)
    with staged_directory(Path(args.out) / f"{loaded.spec.name}-{loaded.spec.grid_name}") as staging:
        (staging / "calibration.json").write_text(json.dumps(result, indent=1))
        (staging / "calibration.md").write_text(text)
    if args.write_defaults:   # beside the weights: the defaults and the sweep that chose them
        directory = bundled_dir(loaded.spec.name)
        defaults = {**loaded.spec.method_defaults, **result["defaults"]}
        for name, content in ((METHOD_DEFAULTS, json.dumps(defaults, indent=1)), ("calibration.md", text),
                              ("calibration.json", json.dumps(result, indent=1))):
            write_file(directory / name, content)
    print(text)
    for method, options in result["defaults"].items():
        flags = " ".join(f"--option {k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())
        print(f"{method}: {flags}")
