"""Exploratory (2026-12-02, not part of the package): variants of the learned gate heads,
scored gate-only with all eval edits stored.

Fit on the train split minus the validation edits; tau chosen with the validation edits stored
(as `calibrate --option mode=sequential`); scored on the eval split with all eval edits stored.
Usage: python heads_explore.py MODEL WORLD OUT.json [--val 300] [--variants a,b] [--key-layer 0]

Kept as the record of the runs in `docs/experiments/lifelong_gate.md`. Its fit loop is a copy of
`heads.fit_gate_heads` with the loss variants (image contrast, hard M-Loc weight) added; the
two-layer heads it found are now `fit_gate_heads(..., mlp=N)` (`calibrate --option heads_mlp=N`),
which is what to call outside this record.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from dualedit.backbones.registry import get_backbone
from dualedit.data.mmedit import load_split
from dualedit.editors.dualedit import DualEditor
from dualedit.editors.dualedit.calibrate import best_threshold
from dualedit.editors.dualedit.gate import learned_similarity
from dualedit.editors.dualedit.gate_fit import answer_of, gate_fit_data
from dualedit.editors.dualedit.heads import BLOCK_KINDS, PASS_KINDS, GateHeads
from dualedit.evaluate import load_vlm
from dualedit.train.data import split_indices


class Heads(GateHeads):
    def __init__(self, hidden, width=64, mlp=0):
        super().__init__(hidden, width, mlp=0)  # linear base; the two-layer nets are below
        if mlp:
            image_in = self.image.in_features
            self.image_net = nn.Sequential(
                nn.Linear(image_in, mlp), nn.GELU(), nn.Linear(mlp, width))
            self.question_net = nn.Sequential(
                nn.Linear(hidden, mlp), nn.GELU(), nn.Linear(mlp, width))
        else:
            self.image_net, self.question_net = self.image, self.question

    def embed_features(self, image, question, has_image):
        p = self.image.weight
        image = ((image.to(p) - self.image_mean) / self.image_std) * has_image.to(p)
        question = (question.to(p) - self.question_mean) / self.question_std
        e = F.normalize(self.image_net(image), dim=-1) * has_image.to(p)
        q = F.normalize(self.question_net(question), dim=-1)
        return torch.cat([e, q], dim=-1)


def fit(parts, answers, *, width=64, mlp=0, steps=3000, batch=256, lr=3e-3, seed=0,
        img_nce=0.0, hard_w=1.0, wd=0.0, drop=0.0, stored=None):
    kinds = [k for k in PASS_KINDS + BLOCK_KINDS if k in parts]
    n = len(parts["edit"]["prompt_end"])
    feats = {k: GateHeads.raw_features(parts[k]) for k in ["edit", *kinds]}
    hidden = feats["edit"][1].shape[1]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = Heads(hidden, width, mlp)
    stacked = [torch.cat([feats[k][j] for k in feats if k != "t_loc"]) for j in range(3)]
    heads.standardise_on(*stacked)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=wd)
    b = min(batch, n)
    m = max(1, b // 2) if stored is None else min(stored, b)
    for _ in range(steps):
        rows = torch.randperm(n, generator=gen)[:b]
        stored = rows[:m]
        keys = heads.embed_features(*(f[stored] for f in feats["edit"]))
        sa = answers["edit"][stored]
        loss = torch.zeros(())
        for kind in kinds:
            query = heads.embed_features(*(f[rows] for f in feats[kind]))
            sim = learned_similarity(query, keys)
            own = torch.zeros(b, m, dtype=torch.bool)
            if kind in PASS_KINDS:
                own[torch.arange(m), torch.arange(m)] = True
            amb = (answers[kind][rows][:, None] == sa[None, :]) & ~own
            slot = heads.threshold.expand(b, 1)
            logits = torch.cat([sim, slot], 1) * heads.scale.abs()
            blocked = torch.cat([amb, torch.zeros(b, 1, dtype=torch.bool)], 1)
            logits = logits.masked_fill(blocked, -1e4)
            target = torch.where(own.any(1), own.float().argmax(1), torch.full((b,), m))
            w = hard_w if kind == "m_loc_hard" else 1.0
            loss = loss + w * F.cross_entropy(logits, target)
        if img_nce:
            # edit image vs own V-Gen image, other records' edit images as negatives
            e = heads.embed_features(*(f[rows] for f in feats["edit"]))[:, :heads.width]
            v = heads.embed_features(*(f[rows] for f in feats["v_gen"]))[:, :heads.width]
            has = feats["edit"][2][rows][:, 0] > 0
            lg = (v @ e.T) * heads.scale.abs()
            loss = loss + img_nce * F.cross_entropy(lg[has][:, has], torch.arange(int(has.sum())))
        opt.zero_grad()
        loss.backward()
        opt.step()
    heads.eval()
    return heads


def decide(heads, parts, kinds, extra=None, mask=None):
    """Best similarity and whether it is the query's own edit, with the edits of `parts` stored
    (and those of `extra`, distractors: another set of records' edits, stored after them).
    mask: (answers of `parts`, answers of `extra` or None), shared ids: a stored edit whose
    question's unedited answer equals a query's unedited answer may edit the very fact the
    query asks (train records repeat facts) and is left out of that query's maximum, as the
    heads' fit masks it (a T-Gen / V-Gen query's own edit is kept)."""
    stored = [parts] if extra is None else [parts, extra]
    blocked = None
    if mask is not None:
        mine, theirs = mask
        answers = mine["edit"] if theirs is None else torch.cat([mine["edit"], theirs["edit"]])
        blocked = same_masks({k: mine[k].tolist() for k in kinds}, answers.tolist(), kinds)
    return decide_blocked(heads, parts, stored, kinds, blocked)


def facts_of(entry):
    """The facts {kind: (entity, attribute) or None} a record's inputs ask, from the world's
    record index (exact labels, read for validation records only)."""
    own = (entry["entity"], entry["kind"])
    return {"edit": own, "t_gen": own, "v_gen": own,
            "m_loc": (entry["m_loc_entity"], entry["m_loc_kind"]),
            "m_loc_hard": (entry["hard_m_loc_entity"], entry["hard_m_loc_kind"]), "t_loc": None}


def rows_of(parts, rows):
    return {k: {p: t[rows] for p, t in v.items()} for k, v in parts.items()}


@torch.no_grad()
def decide_blocked(heads, queries, stored, kinds, blocked):
    """Like `decide` with the edits of the part sets `stored` (queries' own first) and, per
    kind, a [n, n_stored] mask of stored edits left out of a query's maximum."""
    keys = torch.cat([heads.embed(p["edit"]) for p in stored])
    out = {}
    for kind in kinds:
        sim = learned_similarity(heads.embed(queries[kind]), keys)
        if blocked is not None:
            sim = sim.masked_fill(blocked[kind], -2.0)
        best, pos = sim.max(1)
        out[kind] = (best, pos == torch.arange(len(pos)))
    return out


def same_masks(query, stored, kinds):
    """{kind: [n, n_stored] bool}: query value equals stored value, a pass kind's own kept."""
    out = {}
    for kind in kinds:
        q = query[kind]
        same = torch.tensor([[a is not None and a == b for b in stored] for a in q])
        if kind in PASS_KINDS:
            same[torch.arange(len(q)), torch.arange(len(q))] = False
        out[kind] = same
    return out


def rule_check(heads, vp, fp, kinds, val_answers, fit_answers, val_facts, fit_facts):
    """Validation only: choose tau on the first half of the validation edits by each rule, and
    score it on the second half with a memory of the second half's edits and the fit records'
    (850 stored), collisions of the very same fact masked by the world's labels."""
    h = len(val_facts) // 2
    a_rows, b_rows = torch.arange(h), torch.arange(h, len(val_facts))
    va, vb = rows_of(vp, a_rows), rows_of(vp, b_rows)
    ans_a = {k: v[a_rows] for k, v in val_answers.items()}
    fa_, fb_ = val_facts[:h], val_facts[h:]
    stored_b = [f["edit"] for f in fb_] + [f["edit"] for f in fit_facts]
    exact_b = same_masks({k: [f[k] for f in fb_] for k in kinds}, stored_b, kinds)
    scored = decide_blocked(heads, vb, [vb, fp], kinds, exact_b)
    ans_mask = {"val_fit": None}
    stored_ans = torch.cat([ans_a["edit"], fit_answers["edit"]]).tolist()
    ans_mask["val_fit_masked"] = same_masks({k: ans_a[k].tolist() for k in kinds}, stored_ans,
                                            kinds)
    stored_a = [f["edit"] for f in fa_] + [f["edit"] for f in fit_facts]
    ans_mask["val_fit_exact"] = same_masks({k: [f[k] for f in fa_] for k in kinds}, stored_a,
                                           kinds)
    rules = {"val": decide_blocked(heads, va, [va], kinds, None),
             "val_masked": decide_blocked(heads, va, [va], kinds, same_masks(
                 {k: ans_a[k].tolist() for k in kinds}, ans_a["edit"].tolist(), kinds))}
    for name, mask in ans_mask.items():
        rules[name] = decide_blocked(heads, va, [va, fp], kinds, mask)
    out = {}
    for name, dec in rules.items():
        tau = choose(dec)
        out[name] = {"tau": round(tau, 4), "second_half_850_stored": score(scored, tau)}
    return out


def choose(dec):
    pos = torch.cat([dec[k][0][dec[k][1]] for k in PASS_KINDS])
    neg = torch.cat([dec[k][0] for k in BLOCK_KINDS if k in dec])
    tau, acc = best_threshold(pos, neg)
    return tau


def score(dec, tau):
    r = {}
    for k, (best, own) in dec.items():
        ok = (own & (best >= tau)) if k in PASS_KINDS else (best < tau)
        r[k] = round(100 * ok.float().mean().item(), 1)
    r["mean"] = round(sum(r.values()) / len(r), 2)
    return r


VARIANTS = {
    "base": {},
    "w128": {"width": 128},
    "mlp256": {"mlp": 256},
    "nce05": {"img_nce": 0.5},
    "nce1": {"img_nce": 1.0},
    "hard2": {"hard_w": 2.0},
    "steps6k": {"steps": 6000},
    "mlp256_nce05": {"mlp": 256, "img_nce": 0.5},
    "wd": {"wd": 0.05},
    # 2026-12-03: train against a memory closer to the one scored (700 fit records per step).
    "mlp256_all_s350": {"mlp": 256, "batch": 700, "stored": 350},
    "mlp256_all_s525": {"mlp": 256, "batch": 700, "stored": 525},
    "mlp256_all_s640": {"mlp": 256, "batch": 700, "stored": 640},
    "mlp512": {"mlp": 512},
    "mlp256_steps6k": {"mlp": 256, "steps": 6000},
    "mlp256_w128": {"mlp": 256, "width": 128},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("world")
    ap.add_argument("out")
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--key-layer", type=int, default=0,
                    help="the layer the key parts are read at (the adapters' text layer)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, processor = load_vlm(a.model)
    model.eval()
    backbone = get_backbone(model)
    editor = DualEditor(model, processor, backbone, text_layer=a.key_layer,
                        visual_layer=a.key_layer + 1,
                        gate_key="learned")
    train = load_split(a.world, "vqa", "train")
    ev = load_split(a.world, "vqa", "eval")
    fit_idx, val_idx = split_indices(len(train), a.val)
    n_eval = len(ev) if a.limit is None else a.limit
    t = time.time()
    with torch.no_grad():
        fp, fa = gate_fit_data(editor, train, fit_idx)
        vp, _ = gate_fit_data(editor, train, val_idx)
    vocab = {}
    fit_answers, val_answers = (
        {k: torch.tensor([vocab.setdefault(answer_of(train[i], k), len(vocab)) for i in idx])
         for k in fp} for idx in (fit_idx, val_idx))
    with open(f"{a.world}/world.json") as f:
        index = json.load(f)["record_index"]["vqa_train"]
    val_facts = [facts_of(index[i]) for i in val_idx]
    fit_facts = [facts_of(index[i]) for i in fit_idx]
    with torch.no_grad():
        ep, _ = gate_fit_data(editor, ev, list(range(n_eval)))
    print(f"features {time.time() - t:.0f}s", flush=True)
    kinds = [k for k in PASS_KINDS + BLOCK_KINDS if k in ep]
    results = {}
    for name in a.variants.split(","):
        t = time.time()
        heads = fit(fp, fa, **VARIANTS[name])
        tau = choose(decide(heads, vp, kinds))
        val = score(decide(heads, vp, kinds), tau)
        res = score(decide(heads, ep, kinds), tau)
        # tau chosen with the fit records' edits stored too (a memory of n_fit + n_val edits,
        # still validation queries only)
        big = decide(heads, vp, kinds, extra=fp)
        tau_big = choose(big)
        results[name] = {"tau": round(tau, 4), "val": val, "eval": res,
                         "threshold": round(float(heads.threshold.detach()), 4),
                         "tau_with_fit_edits": round(tau_big, 4),
                         "val_with_fit_edits": score(big, tau_big),
                         "eval_at_that_tau": score(decide(heads, ep, kinds), tau_big)}
        # the same, distractors of the very fact a query asks left out (answer-equality mask)
        eval_dec = decide(heads, ep, kinds)
        for rule, dec in (("masked_val", decide(heads, vp, kinds, mask=(val_answers, None))),
                          ("masked_val_fit", decide(heads, vp, kinds, extra=fp,
                                                    mask=(val_answers, fit_answers)))):
            tau_m = choose(dec)
            results[name][rule] = {"tau": round(tau_m, 4), "val": score(dec, tau_m),
                                   "eval": score(eval_dec, tau_m)}
        # The eval trade-off (diagnostic, never used to choose): eval at a grid of taus.
        results[name]["eval_curve"] = {f"{t:.3f}": score(eval_dec, t)
                                       for t in torch.linspace(0.5, 0.9, 17).tolist()}
        results[name]["rule_check"] = rule_check(heads, vp, fp, kinds, val_answers,
                                                 fit_answers, val_facts, fit_facts)
        print(name, f"{time.time() - t:.0f}s", json.dumps(results[name]), flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
