"""Where ovqa-small loses spatial questions (issue 17): linear probes on the LM's hidden state at the answer
position, layer by layer, on OVQA spatial questions.

    .venv/bin/python benchmarks/spatial_probe.py [--train 800] [--test 200]

For each layer's input (0 = the embeddings, then each decoder layer's output) it fits, on train-split
questions and scores on test-split ones:
- the answer (yes/no) by logistic regression: accuracy;
- the asked relation (left of, right of, above, below) by ridge regression on one-hot targets: accuracy;
- the two named shapes' offsets (x_a - x_b, y_a - y_b, in pixels of the 384-px canvas) by ridge regression:
  R², and the sign of the offset along the question's axis (the answer when the relation is left of or above,
  flipped for right of and below): accuracy.
If the offsets are readable at some layer and the answer is not, the model has fetched both positions and
fails to compare them along the asked axis; if the offsets are not readable, it never fetched them.
"""
from __future__ import annotations

import argparse
import re

import numpy as np
import torch


def named(question: str):
    match = re.match(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question)
    if not match:
        raise ValueError(f"not a spatial question: {question!r}")
    colour_a, kind_a, relation, colour_b, kind_b = match.groups()
    return (colour_a, kind_a), relation, (colour_b, kind_b)


@torch.no_grad()
def features(loaded, examples) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[layers + 1, n, D] answer-position hidden states, [n] answers (1 = yes), [n, 2] offsets, [n] axis signs."""
    from iwp.inputs import make_batch
    states, answers, offsets, relations = [], [], [], []
    for e in examples:
        batch = make_batch(loaded, e.image(), e.question)
        out = loaded.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                           attention_mask=batch.attention_mask, position_ids=batch.positions,
                           output_hidden_states=True)
        last = int(batch.last_idx[0])
        states.append(torch.stack([h[0, last] for h in out.hidden_states]).float().numpy())
        a, relation, b = named(e.question)
        pa = next(s for s in e.scene.shapes if (s.colour, s.kind) == a)
        pb = next(s for s in e.scene.shapes if (s.colour, s.kind) == b)
        offsets.append((pa.x - pb.x, pa.y - pb.y))
        relations.append(relation)
        answers.append(e.answer == "yes")
    return (np.stack(states, 1), np.array(answers, dtype=float), np.array(offsets, dtype=float),
            np.array(relations))


def standardize(train: np.ndarray, test: np.ndarray):
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    x = np.hstack([x, np.ones((len(x), 1))])
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))]) @ w


def logistic(x: np.ndarray, y: np.ndarray, steps: int = 2000, l2: float = 1e-2) -> np.ndarray:
    xt, yt = torch.tensor(np.hstack([x, np.ones((len(x), 1))]), dtype=torch.float64), torch.tensor(y)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return w.detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from iwp.calibration import ovqa
    from iwp.zoo import load
    loaded = load("ovqa-small")
    loaded.model.eval()
    spatial = ovqa.TYPES.index("spatial")
    train = [ovqa.example("train", 5 * i + spatial) for i in range(args.train)]
    test = [ovqa.example("test", 5 * i + spatial) for i in range(args.test)]
    xs_train, y_train, d_train, r_train = features(loaded, train)
    xs_test, y_test, d_test, r_test = features(loaded, test)
    # the answer is yes when the offset along the asked axis has this sign: left of / above need a < b
    axis = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    print(f"{len(train)} train and {len(test)} test spatial questions; 'yes' in {y_test.mean():.0%} of test")
    relations = sorted(axis)
    r_train_id = np.array([relations.index(r) for r in r_train])
    r_test_id = np.array([relations.index(r) for r in r_test])
    print("layer | answer acc | R² dx | R² dy | answer from the probed offsets | relation acc")
    for layer in range(xs_train.shape[0]):
        a, b = standardize(xs_train[layer], xs_test[layer])
        w = logistic(a, y_train)
        answer_acc = ((predict(w, b) > 0) == (y_test > 0.5)).mean()
        r2 = []
        wd = ridge(a, d_train, alpha=10.0)
        pred = predict(wd, b)
        for j in range(2):
            r2.append(1 - ((pred[:, j] - d_test[:, j]) ** 2).sum() / ((d_test[:, j] - d_test[:, j].mean()) ** 2).sum())
        implied = np.array([sign * pred[i, ax] > 0 for i, (ax, sign) in enumerate(axis[r] for r in r_test)])
        implied_acc = (implied == (y_test > 0.5)).mean()
        onehot = np.eye(len(relations))[r_train_id]
        wr = ridge(a, onehot, alpha=10.0)
        relation_acc = (predict(wr, b).argmax(1) == r_test_id).mean()
        print(f"{layer:5d} | {answer_acc:10.1%} | {r2[0]:5.2f} | {r2[1]:5.2f} | {implied_acc:30.1%} | "
              f"{relation_acc:.1%}", flush=True)


if __name__ == "__main__":
    main()
