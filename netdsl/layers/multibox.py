"""SSD's training loss, MultiBoxLoss (weiliu89/caffe, branch `ssd`: multibox_loss_layer.cpp and
bbox_util.cpp's GetGroundTruth, MatchBBox, FindMatches, MineHardExamples, EncodeLocPrediction,
EncodeConfPrediction).

The fork's arithmetic is kept: boxes, overlaps and encoded targets are float32 (its
NormalizedBBox), the losses are computed in the net's dtype. Where the fork leaves an order
unspecified (std::sort of equal losses) the lower prior index comes first."""
from __future__ import annotations

import numpy as np

from ..errors import NetdslError
from ..registry import LOSS, F, Layer, Msg, ShapeError, fmt, register
from .loss import FLT_MIN, normalization, normalizer
from .ssd import CODE_TYPES, F32, NMS_PARAM, _host, _overlaps, check_heads, check_mbox_heads, decode_boxes, nms_fast

MULTIBOX = Msg("MultiBoxLossParameter", {
    "loc_loss_type": F("enum", "SMOOTH_L1", choices=("L2", "SMOOTH_L1")),
    "conf_loss_type": F("enum", "SOFTMAX", choices=("SOFTMAX", "LOGISTIC")),
    "loc_weight": F(float, 1.0), "num_classes": F(int, None, example="21"), "share_location": F(bool, True),
    "match_type": F("enum", "PER_PREDICTION", choices=("BIPARTITE", "PER_PREDICTION")),
    "overlap_threshold": F(float, 0.5), "use_prior_for_matching": F(bool, True), "background_label_id": F(int, 0),
    "use_difficult_gt": F(bool, True), "do_neg_mining": F(bool, None), "neg_pos_ratio": F(float, 3.0),
    "neg_overlap": F(float, 0.5), "code_type": F("enum", "CORNER", choices=CODE_TYPES),
    "encode_variance_in_target": F(bool, False), "map_object_to_agnostic": F(bool, False),
    "ignore_cross_boundary_bbox": F(bool, False), "bp_inside": F(bool, False),
    "mining_type": F("enum", "MAX_NEGATIVE", choices=("NONE", "MAX_NEGATIVE", "HARD_EXAMPLE")),
    "nms_param": F(NMS_PARAM), "sample_size": F(int, 64), "use_prior_for_nms": F(bool, False)})


# =============================================================================================
# bbox_util.cpp, one function each

class GroundTruth:
    """One image's ground truth (GetGroundTruth): float32 boxes (G, 4), sizes (G,), labels (G,)."""

    def __init__(self, rows: np.ndarray):
        self.boxes = rows[:, 3:7].astype(F32)
        self.labels = rows[:, 1].astype(int)
        w, h = self.boxes[:, 2] - self.boxes[:, 0], self.boxes[:, 3] - self.boxes[:, 1]
        self.sizes = np.where((w < 0) | (h < 0), F32(0), w * h).astype(F32)


def ground_truth(layer, label: np.ndarray, num: int, num_classes: int, background: int,
                 use_difficult: bool) -> dict[int, GroundTruth]:
    """The fork's GetGroundTruth: rows [item_id, label, instance, xmin, ymin, xmax, ymax, difficult];
    item_id -1 rows are padding, difficult rows are dropped unless use_difficult_gt. A background
    label aborts the fork (CHECK_NE); a label outside [0, num_classes) or an item_id outside the
    batch (which the fork would abort on, or silently skip) is a located error here."""
    rows = label.reshape(-1, 8).astype(np.float64)
    rows = rows[rows[:, 0] != -1]
    if not use_difficult:
        rows = rows[rows[:, 7] == 0]
    items, labels = rows[:, 0].astype(int), rows[:, 1].astype(int)
    bad = (labels == background) | (labels < 0) | (labels >= num_classes) | (items < 0) | (items >= num)
    if bad.any():
        r = rows[int(np.flatnonzero(bad)[0])]
        raise NetdslError("E0640", f"MultiBoxLoss '{layer.name}': ground-truth row {r.tolist()} of "
                          f"'{layer.spec.bottoms[3]}' has item {int(r[0])} and label {int(r[1])}; items must lie in "
                          f"[0, {num}) and labels in [0, {num_classes}) but not the background label {background}",
                          layer.spec.pos, help="label rows are [item_id, label, instance_id, xmin, ymin, xmax, ymax, "
                          "difficult] (SSD's AnnotatedData layout; item_id -1 pads)")
    return {int(i): GroundTruth(rows[items == i]) for i in np.unique(items)}


def match_bbox(gt: GroundTruth, boxes: np.ndarray, sizes: np.ndarray, label: int, match_type: str,
               threshold: float, ignore_cross_boundary: bool) -> tuple[np.ndarray, np.ndarray]:
    """The fork's MatchBBox of P predicted (or prior) boxes against the ground truth of `label`
    (-1: all): (indices (P,) int: the gt index, -1 unmatched, -2 ignored; overlaps (P,) float32).

    Overlaps above 1e-6 count. Bipartite first: repeatedly the largest overlap between an
    unmatched box and a gt not yet taken (ties: the lower box index, then the lower gt index),
    until every gt is taken or nothing overlaps. PER_PREDICTION then gives each still unmatched box
    its best gt with overlap >= threshold. A box crossing the image border is ignored (-2) with
    ignore_cross_boundary_bbox."""
    n = len(boxes)
    indices, best = np.full(n, -1), np.zeros(n, F32)
    gt_idx = np.arange(len(gt.labels)) if label == -1 else np.flatnonzero(gt.labels == label)
    if not gt_idx.size:
        return indices, best
    ov = np.stack([_overlaps(gt.boxes[g], gt.sizes[g], boxes, sizes) for g in gt_idx], axis=1)   # (P, G')
    if ignore_cross_boundary:
        cross = ((boxes < 0) | (boxes > 1)).any(axis=1)
        indices[cross] = -2
        ov[cross] = 0
    present = ov > F32(1e-6)
    best = np.where(present, ov, F32(0)).max(axis=1).astype(F32)
    pool = np.ones(gt_idx.size, bool)
    while pool.any():
        cand = np.where(present & (indices == -1)[:, None] & pool[None, :], ov, F32(-1))
        k = int(np.argmax(cand))                       # first maximum in (box, gt) row-major order
        i, g = divmod(k, gt_idx.size)
        if cand[i, g] < 0:
            break
        indices[i], best[i], pool[g] = gt_idx[g], ov[i, g], False
    if match_type == "PER_PREDICTION":
        cand = np.where(present & (ov >= F32(threshold)) & (indices == -1)[:, None], ov, F32(-1))
        g = np.argmax(cand, axis=1)
        hit = cand[np.arange(n), g] >= 0
        indices[hit], best[hit] = gt_idx[g[hit]], cand[np.arange(n), g][hit]
    return indices, best


def encode_boxes(priors: np.ndarray, variances: np.ndarray, boxes: np.ndarray, code_type: str,
                 variance_in_target: bool) -> np.ndarray:
    """The fork's EncodeBBox of gt boxes (M, 4) against their priors (M, 4), float32: the inverse
    of `decode_boxes`."""
    pri, box = priors.astype(F32), boxes.astype(F32)
    var = np.ones_like(pri) if variance_in_target else variances.astype(F32)
    if code_type == "CORNER":
        return ((box - pri) / var).astype(F32)
    pw, ph = pri[:, 2] - pri[:, 0], pri[:, 3] - pri[:, 1]
    if code_type == "CORNER_SIZE":
        return ((box - pri) / np.stack([pw, ph, pw, ph], axis=1) / var).astype(F32)
    bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    pcx, pcy = (pri[:, 0] + pri[:, 2]) / F32(2), (pri[:, 1] + pri[:, 3]) / F32(2)
    bcx, bcy = (box[:, 0] + box[:, 2]) / F32(2), (box[:, 1] + box[:, 3]) / F32(2)
    enc = np.stack([(bcx - pcx) / pw, (bcy - pcy) / ph, np.log(bw / pw), np.log(bh / ph)], axis=1)
    return (enc / var).astype(F32)


def smooth_l1(d):
    """SSD's SmoothL1Loss (no sigma): per element loss and gradient."""
    a = abs(d)
    small = a < 1
    return np.where(small, 0.5 * d * d, a - 0.5), np.where(small, d, np.sign(d))


def l2(d):
    """EuclideanLoss of a 1-row blob: 0.5 d^2 and d."""
    return 0.5 * d * d, d


# =============================================================================================
# The layer

@register
class MultiBoxLoss(Layer):
    """SSD's loss (Wei Liu's fork): match priors to ground truth, mine negatives, and add a box
    loss over the matched priors to a class loss over the matched and mined priors, both divided by
    the normaliser of loss_param (VALID, the default: the number of matches). Bottoms: loc
    N x (P * L * 4), conf N x (P * num_classes) (raw scores), priors 1 x 2 x (P * 4) (PriorBox
    tops concatenated on axis 2), label 1 x 1 x G x 8 (SSD's AnnotatedData rows [item_id, label,
    instance_id, xmin, ymin, xmax, ymax, difficult], normalised corners; item_id -1 pads).

    Matching (use_prior_for_matching, the default: priors, else the decoded predictions of each
    loc class) by `match_bbox`. Mining: MAX_NEGATIVE picks, per image, the
    min(neg_pos_ratio x positives, eligible) unmatched priors with overlap < neg_overlap and the
    largest confidence loss (-log p_background, or the logistic loss against the background);
    HARD_EXAMPLE the sample_size largest conf (+ loc) losses of all priors, dropping positives not
    picked; with nms_param (threshold > 0) the candidates first go through greedy NMS by loss.
    NONE scores every prior. Box loss: SMOOTH_L1 (SSD's, without sigma) or L2 (0.5 d^2) of
    prediction - encoded gt (`code_type`), times loc_weight; with encode_variance_in_target both are
    divided by the prior's variance, and, as in the fork, the gradient is copied back without that
    factor. Class loss: SOFTMAX (-log max(p, FLT_MIN)) or LOGISTIC (sigmoid cross-entropy over all
    classes; targets start at background_label_id, as the fork fills them, then 1 for the class).
    As the fork, a term is in the loss only while its bottom's propagate_down is true (the default).
    Gradients flow to loc and conf only."""
    type = "MultiBoxLoss"
    is_loss = True
    n_bottoms = (4, 4)
    bottom_roles = ("the box predictions (mbox_loc)", "the class scores (mbox_conf, before Softmax)",
                    "the priors (mbox_priorbox)", "the ground truth (1 x 1 x G x 8, SSD's label layout)")
    messages = {"multibox_loss_param": MULTIBOX, "loss_param": LOSS}
    reads_mbox_heads = True

    @classmethod
    def check_net(cls, checking):
        if checking.once("ssd mbox heads"):
            check_mbox_heads(checking)

    def validate(self):
        p, errs = self.p, []

        def bad(field, msg, help, code="E0107"):
            errs.append(ShapeError(code, f"MultiBoxLoss '{self.name}': {msg}", field=field if p.has(field) else None,
                                   help=help))

        if p.num_classes is None or p.num_classes < 1:
            bad("num_classes", "needs num_classes (>= 1) in multibox_loss_param", "add `num_classes: 21` "
                "(20 VOC classes and the background)", "E0106" if p.num_classes is None else "E0107")
            return errs
        if p.conf_loss_type == "SOFTMAX" and not 0 <= p.background_label_id < p.num_classes:
            bad("background_label_id", f"background_label_id {p.background_label_id} is not a class in "
                f"[0, {p.num_classes}): the softmax loss labels the negatives with it", "use `background_label_id: 0`")
        if p.map_object_to_agnostic and p.num_classes != (2 if p.background_label_id >= 0 else 1):
            bad("map_object_to_agnostic", "map_object_to_agnostic needs num_classes 2 (1 without a background)",
                "set `num_classes: 2`")
        if p.do_neg_mining is not None and p.do_neg_mining != (p.mining_type != "NONE"):
            bad("do_neg_mining", f"the deprecated do_neg_mining: {str(p.do_neg_mining).lower()} contradicts "
                f"mining_type {p.mining_type} (the fork aborts)", "remove do_neg_mining; mining_type says it")
        if p.mining_type != "NONE" and not p.share_location:
            bad("mining_type", f"mining_type {p.mining_type} needs share_location: true (the fork aborts: \"Currently "
                "only support negative mining if share_location is true\")", "set `mining_type: NONE` or share the "
                "box predictions")
        if p.mining_type == "MAX_NEGATIVE" and p.neg_pos_ratio <= 0:
            bad("neg_pos_ratio", f"neg_pos_ratio must be positive, got {p.neg_pos_ratio}", "use `neg_pos_ratio: 3`")
        if p.mining_type == "HARD_EXAMPLE" and p.sample_size <= 0:
            bad("sample_size", f"sample_size must be positive, got {p.sample_size}", "use `sample_size: 64`")
        return errs

    def loc_classes(self) -> int:
        return 1 if self.p.share_location else self.p.num_classes

    def shape(self, bottoms):
        label = bottoms[3]
        if len(label) != 4 or label[3] not in (8, None):
            raise ShapeError("E0380", f"MultiBoxLoss '{self.name}': the ground truth '{self.spec.bottoms[3]}' must be "
                             f"1 x 1 x G x 8 (SSD's label rows), got {fmt(label)}", involves=(3,),
                             help="feed the label top of an SSD data layer (DigitScenes with `label_format: SSD`)")
        check_heads(self, bottoms, self.p.num_classes, self.loc_classes())
        return [()]

    def allow_force_backward(self, i: int) -> bool:
        return i < 2

    # -- forward: matching, mining, the two losses ----------------------------------------------
    def forward(self, xp, bottoms, params):
        p = self.p
        loc, conf, priors, label = (_host(b) for b in bottoms)
        dtype = bottoms[0].dtype
        n, c, lc = loc.shape[0], p.num_classes, self.loc_classes()
        n_pri = priors.shape[2] // 4
        flat = priors.reshape(-1)
        pri, var = flat[:n_pri * 4].reshape(n_pri, 4).astype(F32), flat[n_pri * 4:n_pri * 8].reshape(n_pri, 4)
        loc = loc.reshape(n, n_pri, lc, 4)
        conf = conf.reshape(n, n_pri, c)
        gts = ground_truth(self, label, n, c, p.background_label_id, p.use_difficult_gt)
        matches, overlaps = self.find_matches(loc, pri, var, gts)
        negs, num_matches = self.mine(conf, loc, pri, var, gts, matches, overlaps)
        norm = normalizer(normalization(self.p, "VALID"), n, n_pri, num_matches)
        down = list(self.spec.propagate_down) + [True, True]
        loss, dloc, dconf = 0.0, np.zeros(loc.shape, dtype), np.zeros(conf.shape, dtype)
        if num_matches >= 1:
            at, d, keep = self.loc_rows(loc, pri, var, gts, matches)
            each, grad = (smooth_l1 if p.loc_loss_type == "SMOOTH_L1" else l2)(d)
            if down[0]:
                loss += p.loc_weight * float((each * keep).sum()) / norm
            dloc[at] = (p.loc_weight / norm) * grad * keep
        rows, target = self.conf_rows(matches, negs, gts, n, n_pri)
        if rows[0].size:
            x = conf[rows]
            if p.conf_loss_type == "SOFTMAX":
                e = np.exp(x - x.max(axis=1, keepdims=True))
                prob = e / e.sum(axis=1, keepdims=True)
                picked = prob[np.arange(len(x)), target]
                if down[1]:
                    loss += float(-np.log(np.maximum(picked, FLT_MIN)).sum()) / norm
                grad = prob
                grad[np.arange(len(x)), target] -= 1
            else:
                pos = (x >= 0).astype(x.dtype)
                if down[1]:
                    loss += float(-(x * (target - pos) - np.log1p(np.exp(x - 2 * x * pos))).sum()) / norm
                grad = 1 / (1 + np.exp(-x)) - target
            dconf[rows] = grad / norm            # a copy, as the fork: a prior listed twice keeps its last row
        return [xp.asarray(np.array(loss, dtype))], (xp.asarray(dloc.reshape(bottoms[0].shape)),
                                                     xp.asarray(dconf.reshape(bottoms[1].shape)))

    def find_matches(self, loc, pri, var, gts):
        """The fork's FindMatches: per image {loc label: indices}, {loc label: overlaps}; the label
        is -1 with share_location. Images without ground truth have no entries."""
        p = self.p
        matches, overlaps = [], []
        _, pri_sizes = decode_boxes(pri, var, np.zeros_like(pri), "CORNER", True)   # the priors' areas
        for i in range(loc.shape[0]):
            m, o = {}, {}
            gt = gts.get(i)
            if gt is not None and not p.use_prior_for_matching:
                for cl in range(self.loc_classes()):
                    lab = -1 if p.share_location else cl
                    if not p.share_location and lab == p.background_label_id:
                        continue
                    boxes, sizes = decode_boxes(pri, var, loc[i, :, cl], p.code_type, p.encode_variance_in_target)
                    m[lab], o[lab] = match_bbox(gt, boxes, sizes, lab, p.match_type, p.overlap_threshold,
                                                p.ignore_cross_boundary_bbox)
            elif gt is not None:
                idx, ov = match_bbox(gt, pri, pri_sizes, -1, p.match_type, p.overlap_threshold,
                                     p.ignore_cross_boundary_bbox)
                if p.share_location:
                    m[-1], o[-1] = idx, ov
                else:                       # each loc class keeps the matches to its own class's gt
                    for cl in range(self.loc_classes()):
                        if cl != p.background_label_id:
                            mine = idx > -1
                            mine[mine] = gt.labels[idx[mine]] == cl
                            m[cl], o[cl] = np.where(mine, idx, -1), ov
            matches.append(m)
            overlaps.append(o)
        return matches, overlaps

    def conf_losses(self, conf_i: np.ndarray, m: dict, gt) -> np.ndarray:
        """The fork's ComputeConfLoss of one image: each prior's class loss (float32) against its
        matched label (the first loc label, in order, that matched it) or the background."""
        p = self.p
        lab = np.full(conf_i.shape[0], p.background_label_id)
        taken = np.zeros(conf_i.shape[0], bool)
        for key in sorted(m):
            hit = (m[key] > -1) & ~taken
            lab[hit], taken = gt.labels[m[key][hit]], taken | hit
        x = conf_i
        if p.conf_loss_type == "SOFTMAX":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            prob = e[np.arange(len(x)), lab] / e.sum(axis=1)
            return (-np.log(np.maximum(prob, FLT_MIN))).astype(F32)
        target = (np.arange(x.shape[1])[None, :] == lab[:, None]).astype(x.dtype)
        pos = (x >= 0).astype(x.dtype)
        return (-(x * (target - pos) - np.log(1 + np.exp(x - 2 * x * pos)))).sum(axis=1).astype(F32)

    def mine(self, conf, loc, pri, var, gts, matches, overlaps) -> tuple[list, int]:
        """The fork's MineHardExamples: per image the mined negative priors (a list, in the order the
        fork appends them), and the number of matches (HARD_EXAMPLE unmatches positives not picked)."""
        p = self.p
        num_matches = sum(int((m > -1).sum()) for ms in matches for m in ms.values())
        negs = [[] for _ in matches]
        if p.mining_type == "NONE":
            return negs, num_matches
        use_nms = p.has("nms_param") and p.nms_param.nms_threshold > 0
        for i, ms in enumerate(matches):
            if not ms:
                continue
            loss = self.conf_losses(conf[i], ms, gts[i])
            if p.mining_type == "HARD_EXAMPLE":
                loss = loss + self.loc_losses(loc, pri, var, gts, matches, i)
            for key in sorted(ms):
                m, ov = ms[key], overlaps[i][key]
                if p.mining_type == "MAX_NEGATIVE":
                    eligible = np.flatnonzero((m == -1) & (ov < F32(p.neg_overlap)))
                    num_sel = min(int(int((m > -1).sum()) * F32(p.neg_pos_ratio)), eligible.size)
                else:
                    eligible = np.arange(m.size)
                    num_sel = min(p.sample_size, eligible.size)
                if use_nms:
                    if p.use_prior_for_nms:
                        boxes = pri
                    else:
                        boxes, _ = decode_boxes(pri, var, loc[i, :, 0 if p.share_location else key], p.code_type,
                                                p.encode_variance_in_target)
                    cand = boxes[eligible]
                    _, sizes = decode_boxes(cand, var[eligible], np.zeros_like(cand), "CORNER", True)
                    kept = nms_fast(cand, sizes, loss[eligible], -np.inf, p.nms_param.nms_threshold, 1.0,
                                    p.nms_param.top_k if p.nms_param.top_k is not None else -1)
                    picked = eligible[kept[:num_sel]]
                else:
                    picked = eligible[np.argsort(-loss[eligible], kind="stable")[:num_sel]]
                sel = np.zeros(m.size, bool)
                sel[picked] = True
                if p.mining_type == "HARD_EXAMPLE":
                    drop = (m > -1) & ~sel
                    num_matches -= int(drop.sum())
                    m[drop] = -1
                negs[i].extend(np.flatnonzero((m == -1) & sel).tolist())
        return negs, num_matches

    def loc_losses(self, loc, pri, var, gts, matches, i) -> np.ndarray:
        """The fork's ComputeLocLoss for image i (HARD_EXAMPLE mining): each matched prior's box loss."""
        out = np.zeros(loc.shape[1], F32)
        if any((m > -1).any() for m in matches[i].values()):
            (_, js, _), d, keep = self.loc_rows(loc[i:i + 1], pri, var, {0: gts[i]}, matches[i:i + 1])
            each, _ = (smooth_l1 if self.p.loc_loss_type == "SMOOTH_L1" else l2)(d)
            out[js] = (each * keep).sum(axis=1)
        return out

    def loc_rows(self, loc, pri, var, gts, matches):
        """EncodeLocPrediction: the matched (image, prior, loc class) positions in the fork's order,
        prediction - encoded gt (M, 4), and a mask that is 0 where bp_inside replaces the prediction
        by its target (a coordinate of the matched box outside the image)."""
        p = self.p
        ii, jj, cc, gt_boxes = [], [], [], []
        for i, ms in enumerate(matches):
            for key in sorted(ms):
                js = np.flatnonzero(ms[key] > -1)
                ii.append(np.full(js.size, i))
                jj.append(js)
                cc.append(np.full(js.size, 0 if p.share_location else key))
                gt_boxes.append(gts[i].boxes[ms[key][js]])
        ii, jj, cc = np.concatenate(ii), np.concatenate(jj), np.concatenate(cc)
        target = encode_boxes(pri[jj], var[jj], np.concatenate(gt_boxes), p.code_type, p.encode_variance_in_target)
        pred = loc[ii, jj, cc]
        keep = np.ones(pred.shape)
        if p.bp_inside:
            box = pri[jj]
            if not p.use_prior_for_matching:
                box, _ = decode_boxes(pri[jj], var[jj], pred, p.code_type, p.encode_variance_in_target)
            keep = ((box >= 0) & (box <= 1)).astype(np.float64)
            pred = np.where(keep > 0, pred, target)
        if p.encode_variance_in_target:
            pred, target = pred / var[jj].astype(F32), target / var[jj].astype(F32)
        return (ii, jj, cc), pred - target.astype(pred.dtype), keep

    def conf_rows(self, matches, negs, gts, n, n_pri):
        """EncodeConfPrediction: the (image, prior) rows the class loss scores, in the fork's order,
        and their targets (class indices for SOFTMAX, one-hot rows for LOGISTIC)."""
        p = self.p
        ii, jj, lab = [], [], []
        if p.mining_type == "NONE":
            full, scored = np.full((n, n_pri), p.background_label_id), np.zeros((n, n_pri), bool)
            for i, ms in enumerate(matches):
                for key in sorted(ms):
                    hit = ms[key] > -1
                    full[i, hit], scored[i, hit] = self.gt_label(gts[i], ms[key][hit]), True
            ii, jj = np.repeat(np.arange(n), n_pri), np.tile(np.arange(n_pri), n)
            lab = full.reshape(-1)
        else:
            for i, ms in enumerate(matches):
                for key in sorted(ms):
                    js = np.flatnonzero(ms[key] > -1)
                    ii.append(np.full(js.size, i))
                    jj.append(js)
                    lab.append(self.gt_label(gts[i], ms[key][js]))
                ii.append(np.full(len(negs[i]), i))
                jj.append(np.array(negs[i], int))
                lab.append(np.full(len(negs[i]), p.background_label_id))
            ii, jj = np.concatenate(ii or [[]]).astype(int), np.concatenate(jj or [[]]).astype(int)
            lab = np.concatenate(lab or [[]]).astype(int)
        if p.conf_loss_type == "SOFTMAX":
            return (ii, jj), lab
        # the fork fills the targets with background_label_id, then sets a 1 at each scored row's class;
        # without mining the unmatched priors are not scored rows: their targets keep the fill
        target = np.full((lab.size, p.num_classes), float(p.background_label_id))
        on = (lab >= 0) & (lab < p.num_classes) & (scored.reshape(-1) if p.mining_type == "NONE" else True)
        target[np.flatnonzero(on), lab[on]] = 1
        return (ii, jj), target

    def gt_label(self, gt, idx) -> np.ndarray:
        p = self.p
        return np.full(len(idx), p.background_label_id + 1) if p.map_object_to_agnostic else gt.labels[idx]

    def backward(self, xp, saved, dtops, params, need):
        dloc, dconf = saved
        w = dtops[0]
        return [dloc * w if need[0] else None, dconf * w if need[1] else None, None, None], []
