"""Phase 4 of ovqa-small's recipe (`iwp train --stage lookup`): supervise what the lookup layer's output holds.

Measured on the polished model (benchmarks/spatial_probe.py): at the lookup layer its two guided heads put 85%
and 98% of their attention on a spatial question's two shapes, and every visual token's own place is linearly
readable from the residual stream (R² 0.94), yet the two shapes' offset is not readable from the answer
position at any layer (R² 0.0), nor is the relation asked (left of, right of, above, below: 26-33% for four
classes), and spatial answers are at chance. The heads fetch the shapes' colour and kind and leave their places
behind, and no head fetches the relation word: nothing asks for either until a later layer can compare them,
and no later layer learns to compare what is not there. So linear heads on the lookup layer's output at each
answer position ask for what the answer is made of: a spatial question's two shapes' (x, y) and its relation,
and a count. Training only: the heads are not part of the saved model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from iwp.calibration import ovqa

from .train_targets import question_objects, spatial_relation

MAX_COUNT = 6


def lookup_targets(spans: list[list[tuple[int, int]]], questions: list[list[str]], types: list[list[str]],
                   examples: list[ovqa.Example]) -> list[list[tuple]]:
    """Per row, (kind, query position, target) for each spatial or counting turn: the query is the position
    that predicts the answer's first token. A spatial turn gives two: "places", [x_a, y_a, x_b, y_b] of its
    two shapes in [0, 1] of the canvas, and "relation", the index of its relation in ovqa.RELATIONS; a
    counting turn gives "counting", the count."""
    out = []
    for row_spans, row_questions, row_types, e in zip(spans, questions, types, examples):
        rows = []
        for (start, _), question, qtype in zip(row_spans, row_questions, row_types):
            if qtype == "spatial":
                a, b = (e.scene.shapes[ids[0] - 1] for ids in question_objects(e.scene, question))
                relation = ovqa.RELATIONS.index(spatial_relation(question))
                rows.append(("places", start - 1, torch.tensor([a.x, a.y, b.x, b.y]) / ovqa.CANVAS))
                rows.append(("relation", start - 1, torch.tensor(relation)))
            elif qtype == "counting":
                count = sum(1 for _ in ovqa.referents(e.scene, question))
                rows.append(("counting", start - 1, torch.tensor(min(count, MAX_COUNT))))
        out.append(rows)
    return out


class LookupHeads(torch.nn.Module):
    """Linear heads on the lookup layer's output: a spatial question's two places and relation, and a count."""

    def __init__(self, hidden: int):
        super().__init__()
        self.places = torch.nn.Linear(hidden, 4)
        self.relation = torch.nn.Linear(hidden, len(ovqa.RELATIONS))
        self.count = torch.nn.Linear(hidden, MAX_COUNT + 1)
        self.last: dict[str, float] = {}

    def forward(self, hidden: torch.Tensor, targets: list[list[tuple]], index: list[torch.Tensor]) -> torch.Tensor:
        """`hidden` [B, W, D] is the lookup layer's output over each row's kept tokens, `index[b]` their
        positions in the full sequence (training drops background tokens in phase 2)."""
        picked = {"places": ([], []), "relation": ([], []), "counting": ([], [])}
        for b, rows in enumerate(targets):
            compact = torch.full((int(index[b].max()) + 1,), -1, dtype=torch.long)
            compact[index[b]] = torch.arange(len(index[b]))
            for kind, query, target in rows:
                picked[kind][0].append(hidden[b, compact[query]])
                picked[kind][1].append(target)
        loss, self.last = hidden.sum() * 0, {}
        if picked["places"][0]:
            places = self.places(torch.stack(picked["places"][0]).float())
            error = F.mse_loss(torch.sigmoid(places), torch.stack(picked["places"][1]).float())
            loss = loss + 10 * error
            self.last["places_mse"] = float(error.detach())
        for kind, head in (("relation", self.relation), ("counting", self.count)):
            if picked[kind][0]:
                logits = head(torch.stack(picked[kind][0]).float())
                wanted = torch.stack(picked[kind][1])
                loss = loss + F.cross_entropy(logits, wanted)
                self.last[f"{kind}_accuracy"] = float((logits.argmax(-1) == wanted).float().mean())
        return loss
