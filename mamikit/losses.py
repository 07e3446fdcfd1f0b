"""The objectives of section 3.5: L0 (eq. 1), L1 (eq. 2), L2 (eq. 3-4), per task (eq. 5) and dataset (eq. 6).

Every loss is a plain function of tensors, vectorised over the pairs (i, j)
of a batch. Unknown targets (-1, e.g. a label a dataset does not annotate for
a row) take no part in L0 and L2: their terms are left out and the means are
taken over the remaining terms (with every target known, these are exactly the
normalisations 1/(N_i N_c) and 1/(N_i (N_i - 1) N_c) of eq. 5).

Eq. 1 is unweighted in the paper; the authors' code weighs each label's
positive term by negatives/positives counted on the training split
(``BCEWithLogitsLoss(pos_weight=...)``): :func:`label_pos_weights` counts them
and the losses take them as ``pos_weight`` ({task: {label: weight}}).

Eq. 3-4 as the authors' code computes them (``contrastive_as_coded``, row 8
of docs/fidelity.md) is :func:`contrastive_loss_as_coded`.

Batches of a one-modality dataset (section 6: a text-only corpus, an
image-only set; one dataset per batch, algorithm 1): eq. 2 compares each
image encoder's stored vectors with their projections (the text is not
projected, section 3.1), so a batch without images has no eq. 2 term: L1 is 0
there (not NaN, and left out of the logged parts, so a window's logged L1 is
the mean over the batches that have one), while an image-only batch has its
image encoders' terms as a meme batch does. Eq. 3-4 and the query alignment
read the MLP inputs and decoder outputs, which every batch has whatever its
modalities: they apply unchanged.

Beyond the paper's experiments, :func:`query_alignment_loss` is the objective
its conclusion (section 6) proposes from figure 3: each positive instance's
decoder output pulled toward its class query (``query_align``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import MamikitError


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the entries where `weights` is 1; 0 (still differentiable) when none is."""
    total = weights.sum()
    return (values * weights).sum() / total.clamp(min=1)


def label_pos_weights(tasks, train_targets: dict) -> dict[str, dict[str, float]]:
    """Negatives/positives of each label of each task, counted on the training split.

    Args:
        tasks: the tasks (name, dataset, labels).
        train_targets: dataset -> (targets (N, L) 0/1 with -1 unknown, the L label names).
    Returns:
        {task: {label: negatives / positives}}; unknown targets are not counted,
        and a label without a positive counts one (a finite weight).
    """
    out = {}
    for task in tasks:
        if task.dataset not in train_targets:
            continue
        targets, labels = train_targets[task.dataset]
        weights = {}
        for label in task.labels:
            if label not in labels:
                raise MamikitError(f"task {task.name}: label {label} is not among the {task.dataset} labels {labels}")
            column = targets[:, list(labels).index(label)]  # numpy or torch, read only
            pos, neg = int((column == 1).sum()), int((column == 0).sum())
            weights[label] = neg / max(pos, 1)
        out[task.name] = weights
    return out


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
             pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Equation 1: binary cross-entropy averaged over instances and classes.

    Eq. 1 as printed lacks the minus sign (it is a log-likelihood); section 3.5
    says it is minimised as a binary cross-entropy, so this is the standard
    negative log-likelihood (``BCEWithLogits``).

    Args:
        logits: (N, C) raw scores.
        targets: (N, C) 0/1 (other values only where `valid` is False).
        valid: (N, C) bool, False = unknown target, left out; None = all known.
        pos_weight: (C,) weight of each class's positive term, as ``BCEWithLogitsLoss``; None = 1.
    Returns:
        Scalar mean over the valid (i, c).
    """
    if valid is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    y = torch.where(valid, targets, torch.zeros_like(targets)).to(logits.dtype)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)  # (N, C)
    return _masked_mean(loss, valid.to(logits.dtype))


def _off_diagonal(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)  # (N, N) True for i != j


def projection_alignment_loss(encoded: torch.Tensor, projected: torch.Tensor, all_pairs: bool = False) -> torch.Tensor:
    """Equation 2: |cos(f_i, f_j) - cos(g_i, g_j)| over ordered pairs i != j, per token position.

    Args:
        encoded: (N, P, Din) backbone vectors f.
        projected: (N, P, D) their projections g.
        all_pairs: average over all N x N pairs, the diagonal included (the authors' ``L1Loss``).
    Returns:
        Scalar: the mean over the N (N - 1) ordered pairs (eq. 5's 1/(N_i (N_i - 1))),
        then over the P positions; 0 when N < 2 (unless `all_pairs`).
    """
    n = encoded.shape[0]
    if n < 2 and not all_pairs:
        return projected.sum() * 0.0
    f = F.normalize(encoded.to(projected.dtype), dim=-1)
    g = F.normalize(projected, dim=-1)
    sim_f = torch.einsum("ipd,jpd->pij", f, f)  # (P, N, N)
    sim_g = torch.einsum("ipd,jpd->pij", g, g)  # (P, N, N)
    if all_pairs:
        return (sim_f - sim_g).abs().mean()
    diff = (sim_f - sim_g).abs()[:, _off_diagonal(n, g.device)]  # (P, N(N-1))
    return diff.mean()


def contrastive_embedding_loss(
    layer_inputs: list[torch.Tensor], targets: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Equations 3-4: label-aware cosine embedding loss on the input of every MLP layer.

    L2(i, j, c) = 1/2 sum_l (1 - s_c s_h), s_c = (2 y_ic - 1)(2 y_jc - 1) and
    s_h the cosine similarity of h^{l-1}_{i,c} and h^{l-1}_{j,c}.

    Args:
        layer_inputs: per MLP layer, its input (N, C, D_l).
        targets: (N, C) 0/1.
        valid: (N, C) bool, False = unknown target; a pair counts for class c
            only when both targets are known. None = all known.
    Returns:
        Scalar: 1/(N (N - 1) C) sum over i != j and c of L2(i, j, c) (over the
        counted triples when some targets are unknown); 0 when N < 2.
    """
    n, c = targets.shape
    if valid is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    dtype = layer_inputs[0].dtype
    sign = torch.where(valid, 2.0 * targets - 1.0, torch.zeros_like(targets)).to(dtype).T  # (C, N) in {-1, 1}
    s_c = sign.unsqueeze(2) * sign.unsqueeze(1)  # (C, N, N)
    loss = torch.zeros((c, n, n), dtype=dtype, device=targets.device)
    for h in layer_inputs:  # a handful of layers, never pairs
        h = F.normalize(h, dim=-1)
        s_h = torch.einsum("icd,jcd->cij", h, h)  # (C, N, N)
        loss = loss + 0.5 * (1.0 - s_c * s_h)
    v = valid.T.to(dtype)  # (C, N)
    pair = v.unsqueeze(2) * v.unsqueeze(1) * _off_diagonal(n, targets.device)  # (C, N, N)
    return _masked_mean(loss, pair)


def _coded_term(h: torch.Tensor, s_c: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """One layer's term as the authors' code has it: 0.5 * mean over kept pairs of m * (1 - s_c s_h) / 2."""
    h = F.normalize(h, dim=-1)
    s_h = torch.einsum("icd,jcd->cij", h, h)  # (C, N, N)
    scale = torch.where(s_c > 0, 0.5, 1.0).to(h.dtype)  # positive-positive pairs count half
    terms = scale * 0.5 * (1.0 - s_c * s_h)
    return 0.5 * (terms * pair).sum() / pair.sum().clamp(min=1)


def contrastive_loss_as_coded(layer_inputs: list[torch.Tensor], targets: torch.Tensor,
                              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Equations 3-4 as the authors' code trains and logs them (row 8 of docs/fidelity.md).

    Against the printed equations, each layer's term (i) leaves out the pairs
    whose two targets are both negative, (ii) weighs a pair whose targets are
    both positive by 0.5, (iii) is halved once more ("it's symmetric"); the
    mean is over the kept (c, i, j) triples, i != j. The terms are summed over
    the MLP's input (the decoder output) and every hidden layer's output, and
    the hidden layers' terms enter the trained loss twice: the code adds the
    per-layer sum to the total, then adds the input's term to that same sum in
    place and adds it to the total again.

    Args:
        layer_inputs: per MLP layer, its input (N, C, D_l); the first is the MLP's input.
        targets: (N, C) 0/1.
        valid: (N, C) bool, False = unknown target (no pair with it counts). None = all known.
    Returns:
        (trained, logged): L(x) + 2 sum_l L(h_l), and L(x) + sum_l L(h_l) as the code logs it.
    """
    n = targets.shape[0]
    if valid is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    dtype = layer_inputs[0].dtype
    y = torch.where(valid, targets, torch.zeros_like(targets)).to(dtype).T  # (C, N)
    s_c = (2.0 * y - 1.0).unsqueeze(2) * (2.0 * y - 1.0).unsqueeze(1)  # (C, N, N)
    v = valid.T
    either_positive = (y.unsqueeze(2) + y.unsqueeze(1)) > 0  # (C, N, N) not both negative
    pair = (v.unsqueeze(2) & v.unsqueeze(1) & either_positive & _off_diagonal(n, targets.device)).to(dtype)
    first = _coded_term(layer_inputs[0], s_c, pair)
    hidden = sum((_coded_term(h, s_c, pair) for h in layer_inputs[1:]),
                 torch.zeros((), dtype=dtype, device=first.device))
    return first + 2.0 * hidden, first + hidden


def query_alignment_loss(outputs: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Section 6's future work: the decoder output of each positive (meme, label) moves toward the label's query.

    L_q = 1/|P| sum_{(i, c) in P} (1 - cos(o_{i,c}, sg(q_c))), P = {(i, c): y_{i,c} = 1, target known},

    o_{i,c} the last decoder layer's output row of label c for meme i (the MLP
    head's input), q_c the class query of c (the decoder's input row) and sg a
    stop-gradient. Figure 3 (section 5.2) finds the learnt queries on the side
    of denser positives, "centers of positive labels"; the conclusion proposes
    to make the positive outputs closer to them. The reading kept here:

    - A cosine, as eq. 2-4: a direction, not a length (the outputs come out of
      a LayerNorm, the queries do not), on eq. 2-4's scale ([0, 2]).
    - The query is a fixed target (detached): the sentence moves the outputs.
      The queries are the decoder's input for every meme, negatives included;
      pulling them toward the batch's positive outputs would let the two meet
      halfway and move the negatives' input along. They still learn as
      before, through the decoder and the task loss.
    - Negatives contribute nothing: figure 3 shows them spread on the other
      side with no centre of their own to pull toward, and pushing them away
      from the query would need a margin the paper does not give; eq. 1 and
      eq. 3-4 already separate them.

    Args:
        outputs: (N, C, D) decoder output rows, one per label.
        queries: (C, D) the labels' class queries, in the same label order.
        targets: (N, C) 0/1 (other values only where `valid` is False).
        valid: (N, C) bool, False = unknown target, left out; None = all known.
    Returns:
        Scalar mean over the known positive (i, c); 0 (still differentiable) when there is none.
    """
    if valid is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    o = F.normalize(outputs, dim=-1)  # (N, C, D)
    q = F.normalize(queries.detach().to(outputs.dtype), dim=-1)  # (C, D), no gradient to the queries
    cos = (o * q.unsqueeze(0)).sum(-1)  # (N, C)
    positive = valid & (targets == 1)
    return _masked_mean(1.0 - cos, positive.to(outputs.dtype))


def _task_targets(batch, task) -> torch.Tensor:
    """The columns of batch.targets for the task's labels, by name -> (B, C_task)."""
    if batch.targets is None:
        raise MamikitError(f"batch from dataset {batch.dataset!r} has no targets; cannot compute a loss")
    missing = [label for label in task.labels if label not in batch.labels]
    if missing:
        raise MamikitError(f"task {task.name}: labels {missing} are not among the batch's labels {batch.labels}")
    cols = [batch.labels.index(label) for label in task.labels]
    return batch.targets[:, cols]


def _alignment(output, all_pairs: bool = False) -> torch.Tensor | None:
    """L1 summed over the image encoders (it does not depend on the task); None for a batch without images."""
    terms = [projection_alignment_loss(f, g, all_pairs) for f, g in output.projections.values()]
    return torch.stack(terms).sum() if terms else None


def _query_rows(output, task) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's decoder output rows (B, C_task, D) and its labels' class queries (C_task, D), label by label."""
    if output.decoder_out is None or output.queries is None:
        raise MamikitError(f"task {task.name}: query_align needs the decoder's class queries (pooling 'none' or "
                           "'txt_cls'); this output has none")
    rows, idx, labels = output.decoder_rows, [], []
    for label in task.labels:
        row = (task.name, label) if (task.name, label) in rows else (None, label)  # per task, or decoded jointly
        if row not in rows or label not in output.query_labels:
            raise MamikitError(f"task {task.name}: label {label} has no decoder row or class query in this output")
        idx.append(rows.index(row))
        labels.append(output.query_labels.index(label))
    device = output.decoder_out.device
    o = output.decoder_out.index_select(1, torch.tensor(idx, device=device))  # (B, C_task, D)
    q = output.queries.index_select(0, torch.tensor(labels, device=output.queries.device))  # (C_task, D)
    return o, q


def _task_loss(output, batch, task, l1, contrastive: bool, pos_weight=None, contrastive_as_coded: bool = False,
               query_align: bool = False):
    y = _task_targets(batch, task).float()
    valid = (y == 0) | (y == 1)  # -1 (and NaN) = unknown
    logits = output.logits[task.name]
    weight = None
    if pos_weight is not None:
        if task.name not in pos_weight:
            raise MamikitError(f"task {task.name}: no pos_weight given for it (have {sorted(pos_weight)})")
        weight = [pos_weight[task.name][label] for label in task.labels]
    l0 = bce_loss(logits, y, valid, weight)
    total, parts = l0, {"bce": l0.detach()}
    if l1 is not None:
        total = total + l1
        parts["proj_align"] = l1.detach()
    if contrastive:
        if contrastive_as_coded:
            l2, logged = contrastive_loss_as_coded(output.mlp_inputs[task.name], y, valid)
        else:
            l2 = logged = contrastive_embedding_loss(output.mlp_inputs[task.name], y, valid)
        total = total + l2
        parts["contrastive"] = logged.detach()
    if query_align:
        o, q = _query_rows(output, task)
        lq = query_alignment_loss(o, q, y, valid)
        total = total + lq
        parts["query_align"] = lq.detach()
    parts["loss"] = total.detach()
    return total, parts


def task_loss(output, batch, task, proj_align: bool, contrastive: bool, pos_weight=None, align_all_pairs: bool = False,
              contrastive_as_coded: bool = False, query_align: bool = False):
    """Equation 5: L0 (+ L1 if `proj_align`) (+ L2 if `contrastive`) (+ L_q if `query_align`) for one task.

    Args:
        output: the model's :class:`~mamikit.model.ModelOutput` for `batch`.
        batch: the :class:`~mamikit.model.Batch`; the task's targets are the
            columns of ``batch.targets`` named by its labels.
        task: the task (name, dataset, labels).
        proj_align: add eq. 2, summed over the image encoders (none in a batch without images: no term).
        contrastive: add eq. 3-4 on the task's MLP inputs.
        pos_weight: {task: {label: weight}} of eq. 1's positive terms (:func:`label_pos_weights`); None = 1.
        align_all_pairs: eq. 2 over all pairs, the diagonal included.
        contrastive_as_coded: eq. 3-4 as the authors' code (:func:`contrastive_loss_as_coded`);
            the "contrastive" part is then the value that code logs.
        query_align: add :func:`query_alignment_loss` (weight 1, as L1 and L2) on the task's decoder
            output rows and class queries (section 6's future work; needs the decoder).
    Returns:
        (scalar loss, dict of detached parts: "bce", "proj_align", "contrastive", "query_align", "loss").
    """
    l1 = _alignment(output, align_all_pairs) if proj_align else None  # None: no image in the batch, no term
    l1 = None if l1 is None else l1.to(output.logits[task.name].device)
    return _task_loss(output, batch, task, l1, contrastive, pos_weight, contrastive_as_coded, query_align)


def dataset_loss(output, batch, tasks, proj_align: bool, contrastive: bool, pos_weight=None,
                 align_all_pairs: bool = False, contrastive_as_coded: bool = False, query_align: bool = False):
    """Equation 6: the mean of eq. 5 over the tasks of ``batch.dataset``.

    Args:
        output, batch, proj_align, contrastive, pos_weight, align_all_pairs, contrastive_as_coded, query_align:
            as for :func:`task_loss`.
        tasks: tasks to consider; those of other datasets are skipped.
    Returns:
        (scalar loss, dict of detached parts: "loss", "proj_align" and
        "<task>/bce", "<task>/contrastive", "<task>/query_align", "<task>/loss" per task).
    """
    tasks = [t for t in tasks if t.dataset == batch.dataset]
    if not tasks:
        raise MamikitError(f"batch from dataset {batch.dataset!r}: no task of that dataset to compute a loss for")
    # L1 is the same for every task of the batch: computed once.
    l1 = _alignment(output, align_all_pairs) if proj_align else None  # None: no image in the batch, no term
    if l1 is not None:
        l1 = l1.to(output.logits[tasks[0].name].device)
    losses, parts = [], {}
    for task in tasks:
        loss, task_parts = _task_loss(output, batch, task, l1, contrastive, pos_weight, contrastive_as_coded,
                                      query_align)
        losses.append(loss)
        for key, value in task_parts.items():
            if key != "proj_align":
                parts[f"{task.name}/{key}"] = value
    total = torch.stack(losses).mean()
    parts["loss"] = total.detach()
    if l1 is not None:
        parts["proj_align"] = l1.detach()
    return total, parts
