"""Quality of the weight-only quantized engines (QUANT=int8|int4) against the float engine, on ONNX Runtime.

    python benchmarks/quant_quality.py ovqa --examples 200        # ovqa-small (trained): accuracy, agreement
    python benchmarks/quant_quality.py random --model llava-ov-0.5b  # random weights: next-token KL, greedy

`ovqa`: each of IWP (at the preset's budget) and unpruned, at fp32, int8 and int4: accuracy on the OVQA test
questions and the share of greedy answers identical to the fp32 engine's, both with 95% Wilson intervals.
`random`: next-token KL(fp32 || quantized) of the prefill logits and the share of 32 greedy tokens equal to
fp32's, position by position, over a few demo scenes. Random weights say nothing about quality: these
numbers only show how far quantization moves the computation. Engines are built (or reused) under --engines;
one JSON report goes to --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from iwp.calibration.evaluate import wilson_interval

QUANTS = ("none", "int8", "int4")


def engines(model: str, methods, engines_dir: Path, **spec) -> dict:
    from iwp.export.engine import build
    from iwp.export.spec import EngineSpec
    return {(method, quant): build(EngineSpec(model, method, quant=quant, **spec), engines_dir)
            for method in methods for quant in QUANTS}


def ovqa(args) -> dict:
    from iwp.calibration.evaluate import MAX_ANSWER_TOKENS, ovqa_items, score
    from iwp.runtime.pipeline import Pipeline
    items = ovqa_items("test", args.examples)
    built = engines("ovqa-small", ("iwp", "none"), Path(args.engines))
    answers = {}
    for key, directory in built.items():
        pipeline = Pipeline.from_engine(directory)
        answers[key] = [pipeline.generate(it.load(), it.question, max_new_tokens=MAX_ANSWER_TOKENS) for it in items]
        print(f"{directory.name}: {len(items)} questions", flush=True)
    rows = []
    for (method, quant), preds in answers.items():
        hits = sum(int(score(p, it.answers) > 0) for p, it in zip(preds, items))
        same = sum(a == b for a, b in zip(preds, answers[(method, "none")]))
        rows.append({"method": method, "quant": quant, "engine": built[(method, quant)].name,
                     "accuracy": hits / len(items), "accuracy_ci95": list(wilson_interval(hits, len(items))),
                     "agreement_with_fp32": same / len(items), "agreement_ci95": list(wilson_interval(same, len(items)))})
    return {"model": "ovqa-small", "questions": len(items), "rows": rows}


def random_weights(args) -> dict:
    from iwp.demo import demo_image
    from iwp.runtime.pipeline import Pipeline
    built = engines(args.model, ("iwp",), Path(args.engines), random_weights=True)
    prompt = "Describe the image."
    runs = {}
    for (method, quant), directory in built.items():
        pipeline = Pipeline.from_engine(directory)
        size = tuple(pipeline.manifest.model.resolution[::-1])
        runs[quant] = []
        for scene in range(args.scenes):
            pre = pipeline.prefill(pipeline.prepare(demo_image(scene, size), prompt))
            tokens = pipeline.decode(pre, args.tokens)
            runs[quant].append((pre.logits.astype(np.float64), tokens, [k.tolist() for k in pre.kept]))
        print(f"{directory.name}: {args.scenes} scenes", flush=True)
        del pipeline
    rows = []
    for quant in QUANTS[1:]:
        kl, agree, kept = [], [], []
        for (ref_logits, ref_tokens, ref_kept), (logits, tokens, got_kept) in zip(runs["none"], runs[quant]):
            p, q = _softmax(ref_logits), _softmax(logits)
            kl.append(float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)))))
            n = min(len(ref_tokens), len(tokens))
            agree.append(sum(a == b for a, b in zip(ref_tokens[:n], tokens[:n])) / max(n, 1))
            kept.append(len(set(ref_kept[0][0]) & set(got_kept[0][0])) / len(ref_kept[0][0]))
        rows.append({"quant": quant, "next_token_kl_mean": float(np.mean(kl)), "next_token_kl": kl,
                     "greedy_agreement_mean": float(np.mean(agree)), "greedy_agreement": agree,
                     "kept_overlap_mean": float(np.mean(kept))})
    return {"model": args.model, "random_weights": True, "scenes": args.scenes, "tokens": args.tokens,
            "prompt": prompt, "rows": rows}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ovqa")
    p.add_argument("--examples", type=int, default=200)
    p = sub.add_parser("random")
    p.add_argument("--model", default="llava-ov-0.5b")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    for p in sub.choices.values():
        p.add_argument("--engines", default="engines")
        p.add_argument("--out", required=True, help="the JSON report's path")
    args = parser.parse_args()
    report = ovqa(args) if args.what == "ovqa" else random_weights(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    for row in report["rows"]:
        print({k: v for k, v in row.items() if not isinstance(v, list) or k.endswith("ci95")})


if __name__ == "__main__":
    main()
