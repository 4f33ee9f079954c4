"""What `netdsl test` reports beyond averaged outputs: proposal recall of a region-proposal net over
held-out scenes (a net with a Proposal layer), a detector's mAP (a net with a detection output), the
mean IoU of a segmentation net (its SoftmaxWithLoss classifies every pixel), and multi-label metrics
of a tagging net (one with a MultiLabelDecode layer given the labels; see the end of this file).

Recall@K/IoU t is pooled over ground-truth boxes: the fraction of all gt boxes, over all scenes,
that have IoU >= t with at least one of the first K proposals of their scene (proposals come
in descending score order, so the first K are the top K). Boxes use the +1 convention of
netdsl.boxes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import boxes
from .backend import to_host
from .errors import NetdslError

TOPS = (50, 100, 300)
IOUS = (0.5, 0.7)


def recall_key(top: int, iou: float) -> str:
    """The output name of one recall figure, e.g. "recall@300/iou0.7"."""
    return f"recall@{top}/iou{iou:g}"


def has_proposal(model: str, phase: str = "TEST") -> bool:
    """Whether `model` (a net file) has a Proposal layer in `phase`."""
    from .check import check_file
    return any(n.layer.makes_proposals for n in check_file(model, phase=phase).graph.nodes)


@dataclass
class RecallCounter:
    """Accumulates, per (top K, IoU threshold), how many gt boxes a scene's proposals cover."""
    tops: tuple = TOPS
    ious: tuple = IOUS
    scenes: int = 0
    gt_boxes: int = 0
    proposals: int = 0
    hits: dict = field(default_factory=dict)

    def add(self, rois, gt) -> None:
        """One scene: rois (R, 5) [batch, x1, y1, x2, y2] or (R, 4), best first; gt (G, 4|5)."""
        rois, gt = _rows(rois), _rows(gt)
        props = rois[:, 1:5] if rois.shape[1] == 5 else rois[:, :4]
        gt = gt[:, :4]
        self.scenes += 1
        self.gt_boxes += len(gt)
        self.proposals += len(props)
        if not len(gt):
            return
        # best IoU of each gt box over the first k proposals, for every k at once
        ious = boxes.bbox_overlaps(gt, props) if len(props) else np.zeros((len(gt), 0))
        for k in self.tops:
            best = ious[:, :k].max(axis=1) if ious.shape[1] else np.zeros(len(gt))
            for t in self.ious:
                key = recall_key(k, t)
                self.hits[key] = self.hits.get(key, 0) + int(np.sum(best >= t))

    def result(self) -> dict[str, float]:
        out = {recall_key(k, t): (self.hits.get(recall_key(k, t), 0) / self.gt_boxes if self.gt_boxes
                                  else float("nan"))
               for k in self.tops for t in self.ious}
        out.update(scenes=self.scenes, gt_boxes=self.gt_boxes,
                   proposals_per_scene=self.proposals / self.scenes if self.scenes else 0.0)
        return out


def _rows(a) -> np.ndarray:
    """a as a float64 (N, C) array; an empty array of any shape becomes (0, 5)."""
    a = np.asarray(a, np.float64)
    return a.reshape(0, 5) if a.size == 0 else a.reshape(-1, a.shape[-1])


def build_test_net(model: str, weights, backend=None, data_dir=None, seed: int = 0):
    """The TEST-phase net of `model` with `weights` (a path or {name: array}) loaded."""
    from .executor import build_net
    return build_net(model, "TEST", backend or "cpu", weights=weights, seed=seed, data_dir=data_dir)


def proposal_blobs(net) -> tuple[str, str | None, str]:
    """(rois, scores or None, gt_boxes) blob names of a TEST net: the Proposal layer's tops and the
    DigitScenes layer's third top."""
    prop = net.plan.find("makes_proposals")
    if prop is None:
        raise NetdslError("E0630", f"net '{net.plan.name}' has no Proposal layer in its TEST phase",
                          help="recall is measured on the rois of a Proposal layer (see nets/rpn.net)")
    data = net.plan.find("feeds_scenes")
    if data is None or len(data.layer.spec.tops) < 3:
        raise NetdslError("E0631", f"net '{net.plan.name}' has no DigitScenes layer giving gt_boxes in its TEST "
                          "phase", help="recall needs ground truth: feed the net from a DigitScenes layer")
    tops = prop.layer.spec.tops
    return tops[0], (tops[1] if len(tops) > 1 else None), data.layer.spec.tops[2]



def evaluate_recall(model: str, weights, scenes: int, backend=None, data_dir=None, seed: int = 0,
                    tops=TOPS, ious=IOUS, net=None) -> dict[str, float]:
    """Recall@K/IoU t over `scenes` held-out scenes of the TEST net (its DigitScenes layer, from
    scene 0 with the run seed `seed`), plus counts and timing: "seconds" (forward passes),
    "ms_per_scene" and "proposals_per_second"."""
    if scenes < 1:
        raise NetdslError("E0632", "--iterations (scenes) must be at least 1", help="e.g. --iterations 500")
    net = net or build_test_net(model, weights, backend, data_dir, seed)
    rois_name, _, gt_name = proposal_blobs(net)
    counter = RecallCounter(tuple(tops), tuple(ious))
    seconds = 0.0
    for _ in range(scenes):
        t0 = time.perf_counter()
        net.forward()
        blobs = net.blobs
        rois = to_host(blobs[rois_name])
        seconds += time.perf_counter() - t0
        counter.add(rois, to_host(blobs[gt_name]))
    out = counter.result()
    out.update(seconds=seconds, ms_per_scene=1e3 * seconds / scenes,
               proposals_per_second=counter.proposals / seconds if seconds else 0.0)
    return out


def format_recall(r: dict) -> str:
    """A small table: one row per IoU threshold, one column per top K."""
    tops = sorted({int(k.split("@")[1].split("/")[0]) for k in r if k.startswith("recall@")})
    ious = sorted({float(k.split("/iou")[1]) for k in r if k.startswith("recall@")})
    lines = [(f"proposal recall over {r['scenes']} scenes ({r['gt_boxes']} gt boxes, "
              f"{r['proposals_per_scene']:.0f} proposals per scene)"),
             "IoU   " + "".join(f"{'top ' + str(k):>10}" for k in tops)]
    for t in ious:
        lines.append(f"{t:<6g}" + "".join(f"{r[recall_key(k, t)]:>10.4f}" for k in tops))
    if "ms_per_scene" in r:
        lines.append(f"{r['ms_per_scene']:.1f} ms per scene (forward + proposals), "
                     f"{r['proposals_per_second']:.0f} proposals/s")
    return "\n".join(lines)


def cmd_test_recall(args) -> int:
    """`netdsl test` for a net with a Proposal layer: recall over --iterations held-out scenes."""
    import json

    from .backend import get_backend
    r = evaluate_recall(args.model, args.weights, args.iterations, get_backend(args.device), args.data_dir,
                        args.seed)
    print(json.dumps(r) if args.json else format_recall(r))
    return 0


# =============================================================================================
# Segmentation: intersection over union from a confusion matrix pooled over all test images

class PixelConfusion:
    """Counts (label, predicted class) pairs over every pixel the TEST net's per-pixel
    SoftmaxWithLoss scores (prediction: the argmax over its class axis; pixels labelled
    ignore_label are skipped). IoU of class c = TP / (TP + FP + FN) over all images pooled, as
    SegNet's and the VOC benchmark's scripts compute it; mean_iou averages it over the classes that
    occur (in the labels or the predictions), pixel_accuracy is TP summed / pixels counted."""

    def __init__(self, step, classes: int):
        self.step, self.classes = step, classes
        self.counts = np.zeros((classes, classes), np.int64)

    @classmethod
    def for_net(cls, net) -> PixelConfusion | None:
        """A counter for `net`'s per-pixel classifier, or None when its loss scores one thing per
        image (classes on `axis`, nothing after it)."""
        step = net.plan.find("default_loss")
        if step is None:
            return None
        shape = net.plan.blob_shapes[step.node.bottoms[0]]
        axis = step.layer.p.axis % len(shape)
        if len(shape) - axis < 3 or any(d is None for d in shape):
            return None
        return cls(step, shape[axis])

    def add_net(self, net) -> None:
        """The scores and labels of the net's last forward."""
        scores, labels = (to_host(net.values[b]) for b in self.step.node.bottoms[:2])
        self.add(scores, labels)

    def add(self, scores, labels) -> None:
        """scores: classes on the layer's axis; labels: one per pixel, any layout of that count."""
        p = self.step.layer.p
        pred = np.asarray(scores).argmax(axis=p.axis % scores.ndim).reshape(-1)
        lab = np.asarray(labels).reshape(-1)
        keep = lab != p.ignore_label if p.ignore_label is not None else np.ones(lab.shape, bool)
        lab, pred = lab[keep].astype(np.int64), pred[keep]     # the loss has checked them: 0 <= lab < classes
        self.counts += np.bincount(lab * self.classes + pred, minlength=self.classes ** 2).reshape(self.classes, -1)

    def result(self) -> dict[str, float]:
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(axis=0) + self.counts.sum(axis=1) - tp
        iou = np.divide(tp, union, out=np.full(self.classes, np.nan), where=union > 0)
        out = {"mean_iou": float(np.nanmean(iou)) if (union > 0).any() else float("nan"),
               "pixel_accuracy": float(tp.sum() / max(self.counts.sum(), 1))}
        out.update({f"iou/class{c}": float(v) for c, v in enumerate(iou)})
        return out
# ------------------------------------------------------------------------------------ mAP

def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """PASCAL VOC's average precision (VOC2010 onwards, py-faster-rcnn's voc_eval without the
    07 metric): the area under the precision-recall curve made monotone from the right."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    step = np.flatnonzero(r[1:] != r[:-1])
    return float(((r[step + 1] - r[step]) * p[step + 1]).sum())


@dataclass
class APCounter:
    """Detections and ground truth of many images, scored VOC-style per class at IoU >= iou: each
    class's detections over all images by descending score (stable), each a true positive when its
    best-overlapping gt box of that class in its image (IoU with the +1 convention) reaches the
    threshold and is not taken yet, else a false positive."""
    iou: float = 0.5
    images: int = 0
    dets: list = field(default_factory=list)      # [image, label, score, x1, y1, x2, y2]
    gts: list = field(default_factory=list)       # [image, x1, y1, x2, y2, label]

    def add(self, rows, gt) -> None:
        """One image: detection rows (K, 7) [_, label, score, x1, y1, x2, y2] and gt (G, 5) pixel boxes."""
        rows, gt = np.asarray(rows, np.float64).reshape(-1, 7), np.asarray(gt, np.float64).reshape(-1, 5)
        self.dets += [[self.images, *r[1:]] for r in rows]
        self.gts += [[self.images, *g] for g in gt]
        self.images += 1

    def per_class(self) -> dict[int, float]:
        """AP of every class with ground truth (a class never in the ground truth is left out)."""
        dets, gts = np.array(self.dets).reshape(-1, 7), np.array(self.gts).reshape(-1, 6)
        out = {}
        for c in sorted({int(v) for v in gts[:, 5]}):
            d = dets[dets[:, 1] == c]
            d = d[np.argsort(-d[:, 2], kind="stable")]
            g = gts[gts[:, 5] == c]
            taken = np.zeros(len(g), bool)
            tp = np.zeros(len(d))
            for k, row in enumerate(d):
                mine = np.flatnonzero(g[:, 0] == row[0])
                if not mine.size:
                    continue
                ious = boxes.bbox_overlaps(row[None, 3:7], g[mine, 1:5])[0]
                j = int(np.argmax(ious))
                if ious[j] >= self.iou and not taken[mine[j]]:
                    tp[k], taken[mine[j]] = 1, True
            hits = np.cumsum(tp)
            out[c] = voc_ap(hits / len(g), hits / np.arange(1, len(d) + 1)) if len(d) else 0.0
        return out

    def result(self) -> dict:
        ap = self.per_class()
        return {"mAP": float(np.mean(list(ap.values()))) if ap else float("nan"), "iou": self.iou,
                "ap": {str(c): v for c, v in ap.items()}, "images": self.images, "gt_boxes": len(self.gts),
                "detections": len(self.dets)}


def evaluate_map(model: str, weights, scenes: int, backend=None, data_dir=None, seed: int = 0, iou: float = 0.5,
                 net=None) -> dict:
    """VOC mAP@iou of a detector over `scenes` held-out scenes of its TEST net (its DigitScenes
    layer from scene 0 with run seed `seed`), plus "seconds" and "ms_per_scene"."""
    from .detect import detection_rows, ground_truth
    if scenes < 1:
        raise NetdslError("E0632", "--iterations (scenes) must be at least 1", help="e.g. --iterations 500")
    net = net or build_test_net(model, weights, backend, data_dir, seed)
    counter, seconds = APCounter(iou), 0.0
    for _ in range(scenes):
        t0 = time.perf_counter()
        net.forward()
        rows = detection_rows(net)
        seconds += time.perf_counter() - t0
        counter.add(rows, ground_truth(net))
    out = counter.result()
    out.update(seconds=seconds, ms_per_scene=1e3 * seconds / scenes)
    return out


def format_map(r: dict) -> str:
    lines = [f"mAP@{r['iou']:g} = {r['mAP']:.4f} over {r['images']} scenes ({r['gt_boxes']} gt boxes, "
             f"{r['detections']} detections); VOC AP per class:",
             "  ".join(f"{c}: {v:.3f}" for c, v in r["ap"].items())]
    if "ms_per_scene" in r:
        lines.append(f"{r['ms_per_scene']:.1f} ms per scene (forward + detections)")
    return "\n".join(lines)


def cmd_test_map(args) -> int:
    """`netdsl test` for a detector: mAP@0.5 over --iterations held-out scenes."""
    import json

    from .backend import get_backend
    r = evaluate_map(args.model, args.weights, args.iterations, get_backend(args.device), args.data_dir, args.seed)
    print(json.dumps(r) if args.json else format_map(r))
    return 0
# ------------------------------------------------------------------------ multi-label tagging

def tag_metrics(predicted, truth, scores) -> dict[str, float]:
    """Multi-label metrics of (M, C) arrays: predicted and truth multi-hot (a tag wherever > 0), scores
    the class probabilities the prediction was decoded from.

    Per sample, averaged over samples: precision |P & T| / |P|, recall |P & T| / |T|, F1 2|P & T| /
    (|P| + |T|) (an empty set against an empty set counts 1, against a non-empty one 0); exact: the
    fraction predicted exactly. mAP: the mean over classes with at least one true sample of the
    average precision of that class's ranking of the samples by score (the precision at each true
    sample's rank, averaged; ties keep sample order), independent of any decoding threshold."""
    p, t = np.asarray(predicted) > 0, np.asarray(truth) > 0
    s = np.asarray(scores, np.float64)
    hit, n_p, n_t = (p & t).sum(1), p.sum(1), t.sum(1)
    both_empty = (n_p == 0) & (n_t == 0)

    def ratio(num, den):
        return np.where(den > 0, num / np.maximum(den, 1), both_empty.astype(float))
    aps = []
    for c in range(t.shape[1]):
        if not t[:, c].any():
            continue
        order = np.argsort(-s[:, c], kind="stable")
        rel = t[order, c]
        ranks = np.flatnonzero(rel) + 1
        aps.append(float(np.mean(np.cumsum(rel)[ranks - 1] / ranks)))
    return {"f1": float(ratio(2 * hit, n_p + n_t).mean()), "precision": float(ratio(hit, n_p).mean()),
            "recall": float(ratio(hit, n_t).mean()), "exact": float((p == t).all(1).mean()),
            "mAP": float(np.mean(aps)) if aps else float("nan"), "samples": int(len(t)),
            "tags_per_sample": float(n_p.mean()), "true_tags_per_sample": float(n_t.mean())}


def has_tag_decoder(model: str, stages=()) -> bool:
    """Whether the TEST net of `model` has a MultiLabelDecode layer given the labels to score against."""
    from .check import check_file
    return any(n.layer.decodes_tags and len(n.bottoms) == 2
               for n in check_file(model, phase="TEST", stages=stages).graph.nodes)


def collect_tags(net, iterations: int) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Run the TEST net `iterations` times: the mean of each scalar output, and the decode layer's
    predictions, labels and probabilities as (M, C) host arrays."""
    step = net.plan.find("decodes_tags")
    ax = step.layer.p.axis
    sums: dict[str, float] = {}
    rows: list[list] = [[], [], []]
    for _ in range(iterations):
        for k, v in net.forward().items():
            if v.size == 1:
                sums[k] = sums.get(k, 0.0) + float(v.reshape(-1)[0])
        for out, name in zip(rows, (step.node.tops[0], step.node.bottoms[1], step.node.bottoms[0])):
            a = to_host(net.values[name])
            a = np.moveaxis(a, ax % a.ndim, -1)
            out.append(a.reshape(-1, a.shape[-1]))
    predicted, truth, scores = (np.concatenate(r) for r in rows)
    return {k: v / iterations for k, v in sums.items()}, predicted, truth, scores


def evaluate_tags(model: str, weights, iterations: int, backend=None, data_dir=None, seed: int = 0,
                  stages=()) -> dict[str, float]:
    """`netdsl test` for a tagging net: its averaged outputs and tag_metrics over every test sample."""
    from .executor import build_net
    net = build_net(model, "TEST", backend or "cpu", weights=weights, seed=seed, data_dir=data_dir, stages=stages)
    means, predicted, truth, scores = collect_tags(net, iterations)
    return {**means, **tag_metrics(predicted, truth, scores)}
