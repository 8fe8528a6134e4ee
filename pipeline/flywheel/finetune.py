"""Fine-tune LiteMedSAM from accepted masks: prompt encoder + mask decoder with the image encoder's last
``encoder_stages`` TinyViT stages (default 1) and its neck, trained from the activations that enter those
stages, computed once per slice (the stages below stay frozen, so only the trained part runs forward and
backward: minutes on a CPU); ``encoder_stages=0``: prompt encoder + mask decoder on cached embeddings; or the
whole model (``train_encoder``, meant for a GPU). ``augment`` adds
flipped, turned and brightened copies of the training slices (boxes and masks follow); ``weight_by_edit``
draws the boxes of labels the reviewer changed more more often.

Data: a store's accepted cases (``review_status == "accepted"``), or image/label-map pairs on the same grid.
Each slice is rendered exactly as the annotate run renders it (the case's own configuration: CT window per
label, percentile clip) and embedded once per window; every object (3D connected component per label value)
gives one box per slice (the run's box margin) and its mask there, and has a kind (modality + label). Training
draws boxes with cases and kinds balanced (pipeline/flywheel/selection.py), jitters each box edge by up to
``box_jitter`` of its size, and the loss is BCE + soft Dice on the 256 x 256 low-resolution logits against the
mask resized into the model frame, plus the squared error of the predicted IoU (so the quality score keeps
its meaning).

Every correction is learned from. Cross-validation (``folds``: whole cases when there are enough, else
blocks within each case, so every kind is trained on in every fold) scores each fold's held-out boxes after
every epoch; the epoch count with the best held-out Dice over kinds, among those where no kind loses more than
``tolerance``, is chosen, and the model is then trained that long on *all* the reviewed data. When the choice
is zero epochs, nothing is written: the entry says why and the parent stays.

The result is a full LiteMedSAM state dict (strict-loadable by ``pipeline.model.checkpoint.load_lite_medsam``)
and a registry entry (sha256, parent sha256, what was learned from, the kinds, held-out Dice per kind before
and after, promotion) written next to it as ``CKPT.json`` and, for a store, as ``STORE/_models/<sha16>.json``.
The parent is the store's current model, so "before" is the current model on the same held-out boxes: the new
one becomes current when the cross-validation chose to train (``promote="if-better"``; ``always``/``never`` as
asked), see pipeline/flywheel/registry.py.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsam_engine.pipeline.core.atomic import atomic_file
from medsam_engine.pipeline.core.boxes import jitter_boxes
from medsam_engine.pipeline.core.metrics import dice
from medsam_engine.pipeline.core.provenance import file_sha256, utc_stamp
from medsam_engine.pipeline.flywheel.detector_training import train_from_store
from medsam_engine.pipeline.flywheel.finetune_data import (
    FinetuneOptions,
    SliceSample,
    augmented,
    pair_samples,
    store_samples,
)
from medsam_engine.pipeline.flywheel.registry import current_model, register, registered_models, set_current
from medsam_engine.pipeline.flywheel.selection import (
    Choice,
    Curve,
    Folds,
    balance_weights,
    choose_epochs,
    count_kinds,
    kinds_of,
    make_folds,
)
from medsam_engine.pipeline.model.build import build_runner
from medsam_engine.pipeline.model.checkpoint import LITE_MEDSAM_SHA256, load_lite_medsam
from medsam_engine.pipeline.model.framing import Framing
from medsam_engine.pipeline.model.runner import LiteMedSAMRunner, foreground
from medsam_engine.pipeline.store.case_store import CaseStore
from medsam_engine.pipeline.store.queries import select_cases
from medsam_engine.pipeline.store.records import current_round

log = logging.getLogger(__name__)

PROMOTE_RULES = ("if-better", "always", "never")


# -- the model pieces ---------------------------------------------------------------------------------------
def _embed(net, sample: SliceSample, options: FinetuneOptions) -> torch.Tensor:
    """The sample's (1, 256, 64, 64) embedding: cached, from the encoder's trained last stages and neck on the
    cached activations that enter them, or from the whole encoder when all of it is being trained."""
    device = options.device
    if sample.image is not None:
        return net.image_encoder(torch.from_numpy(sample.image).permute(2, 0, 1)[None].to(device))
    if sample.features is not None:
        encoder = net.image_encoder
        hidden = sample.features.to(device, torch.float32)
        for layer in encoder.layers[len(encoder.layers) - options.encoder_stages :]:
            hidden = layer(hidden)
        side = int(round(hidden.shape[1] ** 0.5))
        return encoder.neck(hidden.view(1, side, side, hidden.shape[2]).permute(0, 3, 1, 2))
    return sample.embedding.to(device, torch.float32)  # type: ignore[union-attr]


def _decode(net, embedding: torch.Tensor, index: np.ndarray, boxes_model: np.ndarray, device: str):
    """(K, 1, 256, 256) low-resolution logits and (K, 1) predicted IoU for some of a slice's boxes."""
    boxes = torch.from_numpy(boxes_model[index]).to(device)[:, None, :]
    sparse, dense = net.prompt_encoder(points=None, boxes=boxes, masks=None)
    return net.mask_decoder(
        image_embeddings=embedding,
        image_pe=net.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


def _loss(low: torch.Tensor, iou: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice on the unpadded part of the low-resolution logits, + MSE of the predicted IoU."""
    h, w = targets.shape[1:]
    logits = low[:, 0, :h, :w]
    probs = torch.sigmoid(logits)
    inter = (probs * targets).sum(dim=(1, 2))
    soft_dice = 1 - (2 * inter + 1) / (probs.sum(dim=(1, 2)) + targets.sum(dim=(1, 2)) + 1)
    with torch.no_grad():
        hard, truth = logits > 0, targets > 0.5
        actual = (hard & truth).sum(dim=(1, 2)) / ((hard | truth).sum(dim=(1, 2)).clamp(min=1))
    return (
        F.binary_cross_entropy_with_logits(logits, targets)
        + soft_dice.mean()
        + F.mse_loss(iou[:, 0], actual.float())
    )


@torch.no_grad()
def evaluate_boxes(net, samples: list[SliceSample], options: FinetuneOptions, framing: Framing) -> np.ndarray:
    """Dice per box of ``samples`` (in order), at the slices' resolution, thresholded as the runner does."""
    scores: list[float] = []
    for sample in samples:
        height, width = sample.original_hw
        new_h, new_w = framing.logits_hw(height, width)
        boxes_model = framing.boxes(sample.boxes, height, width)
        embedding = _embed(net, sample, options)
        for start in range(0, len(sample.boxes), options.boxes_per_step):
            index = np.arange(start, min(start + options.boxes_per_step, len(sample.boxes)))
            low, _ = _decode(net, embedding, index, boxes_model, options.device)
            full = foreground(
                F.interpolate(
                    low[..., :new_h, :new_w], size=(height, width), mode="bilinear", align_corners=False
                )[:, 0]
                .cpu()
                .numpy()
            )
            scores.extend(
                dice(predicted, truth) for predicted, truth in zip(full, sample.masks[index], strict=False)
            )
    return np.asarray(scores, dtype=np.float64)


def _epoch_steps(samples: list[SliceSample], options: FinetuneOptions, rng: np.random.Generator):
    """(sample, box indices) steps of one epoch: ``boxes_per_epoch // boxes_per_step`` slices drawn
    by the weight of their boxes (:func:`balance_weights`: cases and kinds balanced, labels the reviewer
    changed more drawn more often), each with up to ``boxes_per_step`` of its boxes drawn by the same weights.
    A step's cost is one pass through the trained encoder stages, so an epoch costs the same however many
    slices and boxes the data hold."""
    if not samples:
        return []
    weights = balance_weights(samples)
    per_slice = np.array([w.sum() for w in weights])
    count = max(1, options.boxes_per_epoch // options.boxes_per_step)
    steps = []  # fewer slices than steps (a 2D image or two): slices come up again, with other boxes
    for i in rng.choice(
        len(samples), size=count, replace=len(samples) < count, p=per_slice / per_slice.sum()
    ):
        take = min(options.boxes_per_step, len(samples[i].boxes))
        index = rng.choice(len(samples[i].boxes), size=take, replace=False, p=weights[i] / weights[i].sum())
        steps.append((samples[i], np.sort(index)))
    return steps


def trained_prefixes(net, options: FinetuneOptions) -> tuple[str, ...]:
    """Names of the parameters fine-tuning trains: prompt encoder and mask decoder, plus the encoder's last
    ``options.encoder_stages`` stages and its neck."""
    prefixes = ("prompt_encoder.", "mask_decoder.")
    if options.encoder_stages:
        count = len(net.image_encoder.layers)
        prefixes += (
            "image_encoder.neck.",
            *tuple(f"image_encoder.layers.{i}." for i in range(count - options.encoder_stages, count)),
        )
    return prefixes


def _optimiser(net, options: FinetuneOptions) -> torch.optim.Optimizer:
    """AdamW over the parameters fine-tuning trains (the others frozen)."""
    net.eval()  # no dropout; batch-norm statistics of the encoder stay frozen
    trained = trained_prefixes(net, options)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(options.train_encoder or name.startswith(trained))
    trainable = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)


def _epoch(
    net,
    optimiser,
    train_set: list[SliceSample],
    options: FinetuneOptions,
    framing: Framing,
    rng: np.random.Generator,
) -> float | None:
    """One epoch of ``boxes_per_epoch`` jittered boxes drawn by :func:`balance_weights`; its mean loss."""
    losses = []
    for sample, index in _epoch_steps(train_set, options, rng):
        height, width = sample.original_hw
        boxes_model = jitter_boxes(
            framing.boxes(sample.boxes, height, width),
            options.box_jitter,
            rng,
            framing.resized_hw(height, width),
            pixels=False,
        )
        low, iou = _decode(net, _embed(net, sample, options), index, boxes_model, options.device)
        loss = _loss(low, iou, torch.from_numpy(sample.targets[index]).to(options.device))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else None


def fit(
    net,
    train_set: list[SliceSample],
    options: FinetuneOptions,
    framing: Framing,
    *,
    epochs: int,
    held: list[SliceSample] | None = None,
    budget: EpochBudget | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Train ``net`` in place for ``epochs`` epochs on ``train_set``. With ``held``: the held-out Dice per box
    before training and after each epoch ((rows, boxes), rows <= epochs + 1: the fold stops once ``patience``
    epochs in a row did not beat its best, or at the ``budget``'s epoch cap) and the history; without: an
    empty array and the history."""
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    optimiser = _optimiser(net, options)
    rows = [evaluate_boxes(net, held, options, framing)] if held else []
    history: list[dict] = []
    best, waited = (rows[0].mean() if rows else 0.0), 0
    for epoch in range(epochs):
        if budget is not None and epoch >= budget.cap:
            break
        started = time.perf_counter()
        loss = _epoch(net, optimiser, train_set, options, framing, rng)
        entry = {"epoch": epoch + 1, "train_loss": _r(loss)}
        if held:
            rows.append(evaluate_boxes(net, held, options, framing))
            entry["holdout_dice"] = _r(float(rows[-1].mean()))
            best, waited = (rows[-1].mean(), 0) if rows[-1].mean() > best + 1e-4 else (best, waited + 1)
        history.append(entry)
        log.info("fine-tune epoch %d: %s", epoch + 1, entry)
        if budget is not None:
            budget.measured(time.perf_counter() - started)
        if held and waited >= options.patience:
            break
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return (np.vstack(rows) if rows else np.zeros((0, 0))), history


class EpochBudget:
    """How many epochs the folds and the final fit may run so that fine-tuning ends within ``seconds`` of
    ``start``: set from the first fold epoch's time (a final-fit epoch costs about as much, less scoring)."""

    def __init__(self, seconds: float, start: float, folds: int, epochs: int) -> None:
        self.seconds, self.start, self.folds, self.cap = seconds, start, folds, epochs
        self.planned = False

    def measured(self, epoch_seconds: float) -> None:
        """Plan the cap from the first epoch measured (later calls change nothing)."""
        if self.planned:
            return
        self.planned = True
        left = self.seconds - (time.perf_counter() - self.start) + epoch_seconds  # the first epoch counts
        fits = int(left // (epoch_seconds * (self.folds + 1)))
        if fits < self.cap:
            log.info("fine-tune: %d epoch(s) at most, to end within %.0f s", max(1, fits), self.seconds)
            self.cap = max(1, fits)


def cross_validate(
    net,
    folds: Folds,
    extra: dict[int, list[SliceSample]],
    options: FinetuneOptions,
    framing: Framing,
    budget: EpochBudget | None = None,
) -> tuple[Curve, list[dict]]:
    """Train a copy of ``net`` per fold (its training part, plus the ``extra`` augmented copies of whole
    training slices, keyed by ``id`` of the original) and score its held-out part after every epoch, within
    the ``budget``'s epoch cap."""
    per_fold, histories = [], []
    for n, (train_part, held_part) in enumerate(folds.parts):
        copies = [c for s in train_part for c in extra.get(id(s), [])]
        held_part = scored_part(held_part, options.eval_boxes)
        fold_net = copy.deepcopy(net)
        scores, history = fit(
            fold_net,
            train_part + copies,
            options,
            framing,
            epochs=options.epochs,
            held=held_part,
            budget=budget,
        )
        per_fold.append((scores, kinds_of(held_part)))
        histories.append(
            {
                "fold": n + 1,
                "train_boxes": _boxes(train_part + copies),
                "holdout_boxes": _boxes(held_part),
                "history": history,
            }
        )
    return Curve.pooled(per_fold), histories


def scored_part(held: list[SliceSample], boxes: int) -> list[SliceSample]:
    """The held-out slices a fold is scored on after each epoch: all of them up to ``boxes`` boxes, else
    slices spread evenly over the held-out part (in its order) until they hold ``boxes`` boxes."""
    if _boxes(held) <= boxes:
        return held
    order, taken, count = _spread(len(held)), [], 0
    for i in order:
        taken.append(i)
        count += len(held[i].boxes)
        if count >= boxes:
            break
    return [held[i] for i in sorted(taken)]


def _spread(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix is spread over the range (bisection: 0, n/2, n/4, 3n/4, ...)."""
    order, seen, step = [], set(), n
    while len(order) < n:
        for i in range(0, n, max(step, 1)):
            if i not in seen:
                seen.add(i)
                order.append(i)
        step //= 2
    return order


def _boxes(samples: list[SliceSample]) -> int:
    return int(sum(len(s.boxes) for s in samples))


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


# -- saving and the registry ------------------------------------------------------------------------------
def save_checkpoint(net, path: str | Path) -> str:
    """Write ``net``'s full state dict (CPU tensors), check it loads strictly; returns its sha256."""
    with atomic_file(path) as temp:  # the registry never names a half-written checkpoint
        torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, temp)
        load_lite_medsam(temp)  # raises CheckpointError if the file does not fit the architecture
    return file_sha256(path)


def finetune(
    out: str | Path,
    *,
    store: CaseStore | None = None,
    images: list | None = None,
    label_maps: list | None = None,
    parent: str | Path | None = None,
    runner=None,
    options: FinetuneOptions = FinetuneOptions(),
) -> dict:
    """Fine-tune from a store's accepted cases or from image/label-map pairs, save the checkpoint at ``out``
    and register it; returns the registry entry. ``parent`` defaults to the store's current registered model,
    else the official weights. ``runner`` (optional) embeds the slices and must hold the parent's weights."""
    start = time.perf_counter()
    if options.promote not in PROMOTE_RULES:
        raise ValueError(
            f"Argument 'promote' must be one of {', '.join(PROMOTE_RULES)}; got {options.promote!r}"
        )
    if store is not None and not select_cases(store, "accepted")[0]:
        raise ValueError(f"no accepted case in {store.url}: import reviewed corrections first")
    if store is None and (not images or len(images) != len(label_maps or [])):
        raise ValueError("give one label map per image")
    if parent is None and store is not None:
        parent = (current_model(store) or {}).get("checkpoint")
    parent_sha = file_sha256(parent) if parent else LITE_MEDSAM_SHA256
    if runner is not None and runner.model.sha256 != parent_sha:
        raise ValueError("Argument 'runner' must hold the parent model's weights")
    if runner is None:
        backend = "torch" if options.train_encoder else "auto"  # whole-model runs embed inside the loop
        runner = build_runner(
            load_lite_medsam(parent, device=options.device), device=options.device, backend=backend
        )
    if store is not None:
        samples, case_ids = store_samples(store, runner, options)
    else:
        samples, case_ids = pair_samples(list(images or []), list(label_maps or []), runner, options)
    if not samples:
        raise ValueError("the reviewed data hold no object to learn from (every label map is empty)")
    folds = make_folds(samples, options.folds, min_kind_boxes=options.min_kind_boxes)
    if not folds.parts:
        raise ValueError("too few objects to hold any out (one object in all): give more reviewed data")
    extra = augmented(samples, runner, options) if options.augment else {}
    framing = runner.model.framing
    base = copy.deepcopy(runner.model.net).to(
        options.device
    )  # private copies: the runner's model stays as is
    budget = (
        EpochBudget(options.minutes * 60, start, len(folds.parts), options.epochs)
        if options.minutes
        else None
    )
    curve, fold_runs = cross_validate(base, folds, extra, options, framing, budget)
    choice = choose_epochs(curve, tolerance=options.tolerance, min_kind_boxes=options.min_kind_boxes)
    log.info("fine-tune: %s", choice.why)
    entry = {
        "parent_sha256": parent_sha,
        "parent_is_official": parent_sha == LITE_MEDSAM_SHA256,
        "trained": _trained(options) if choice.epochs else "nothing (the parent is kept)",
        "data": {
            "source": "store" if store is not None else "image/label pairs",
            "cases": case_ids,
            "inputs": None
            if store is not None
            else {f"pair{n}": Path(str(image)).name for n, image in enumerate(images or [])},
            "learned_from": _count(samples) if choice.epochs else None,
            "augmented_slices": sum(len(c) for c in extra.values()),
            "kinds": count_kinds(kinds_of(samples)),
            "folds": folds.how,
            "fold_count": len(folds.parts),
        },
        "options": asdict(options),
        "metrics": {
            "holdout_dice_before": choice.before,
            "holdout_dice_after": choice.after,
            "measured_on": f"cross-validation over {folds.how}",
            "per_kind": choice.per_kind,
            "epochs_chosen": choice.epochs,
            "choice": choice.why,
            "folds": fold_runs,
            "epochs_allowed": budget.cap if budget else options.epochs,
        },
        "round": current_round(store) if store is not None else None,
    }
    if choice.epochs:
        _, final = fit(
            base,
            samples + [c for copies in extra.values() for c in copies],
            options,
            framing,
            epochs=choice.epochs,
        )
        entry["metrics"]["final_fit"] = final
        sha = save_checkpoint(base, out)
        entry.update(sha256=sha, checkpoint=str(Path(out).resolve()), name=f"lite-medsam-{sha[:12]}")
    else:
        entry.update(sha256=None, checkpoint=None, name=None)
    entry.update(seconds=round(time.perf_counter() - start, 1), created_at=utc_stamp(precise=True))
    entry["promotion"] = promotion(entry["metrics"], options.promote, parent_sha, choice)
    entry["registry"] = register(entry, Path(out) if choice.epochs else None, store)
    if store is not None and entry["promotion"]["promoted"]:
        set_current(store, entry["sha256"], why=entry["promotion"]["why"])
    return entry


def _trained(options: FinetuneOptions) -> str:
    if options.train_encoder:
        return "whole model"
    if options.encoder_stages:
        return f"last {options.encoder_stages} image encoder stage(s) + neck + prompt encoder + mask decoder"
    return "prompt encoder + mask decoder"


def _count(samples: list[SliceSample]) -> dict:
    return {"cases": sorted({s.case_id for s in samples}), "slices": len(samples), "boxes": _boxes(samples)}


def promotion(metrics: dict, rule: str, parent_sha: str, choice: Choice) -> dict:
    """Champion and challenger: the new model is promoted (becomes the store's current model) when the
    cross-validation chose to train (its held-out Dice beats the parent's, by default the current model, with
    no kind worse by more than the tolerance), or as asked; a run that trained nothing promotes nothing."""
    score = (
        f"held-out Dice {metrics['holdout_dice_after']:.4f} vs {metrics['holdout_dice_before']:.4f} of "
        f"its parent {parent_sha[:12]} ({metrics['measured_on']})"
    )
    if not choice.epochs:
        return {
            "promoted": False,
            "rule": rule,
            "against": parent_sha,
            "why": f"nothing to promote: {choice.why}; no checkpoint written",
        }
    if rule != "if-better":
        promoted = rule == "always"
        return {
            "promoted": promoted,
            "rule": rule,
            "against": parent_sha,
            "why": f"{'promoted' if promoted else 'not promoted'} as asked ({score})",
        }
    return {
        "promoted": True,
        "rule": rule,
        "against": parent_sha,
        "why": f"promoted: it beats its parent {parent_sha[:12]}: {choice.why}",
    }


def retrain_detector(
    store: CaseStore, entry: dict, out: str | Path, *, epochs: int = 200, runner=None
) -> dict:
    """Retrain the learned detector on the store's accepted masks with the fine-tuned model's embeddings, in
    the same round; its version, metrics and parent are added to the model's registry entry (returned).
    ``runner`` may be any runner with the fine-tuned model's image encoder (after decoder-only training, the
    parent's runner and its embedding cache); by default one is built from the checkpoint."""
    if not entry.get("checkpoint"):
        raise ValueError("the fine-tuning run trained nothing: no model to retrain the detector with")
    with_detector = [
        e for e in registered_models(store) if e.get("detector") and e.get("sha256") != entry["sha256"]
    ]
    parent = with_detector[-1]["detector"]["version"] if with_detector else None
    runner = runner or LiteMedSAMRunner(load_lite_medsam(entry["checkpoint"]))
    meta = train_from_store(store, out, runner=runner, epochs=epochs, parent=parent)
    entry = dict(
        entry,
        detector={
            "artefact": str(Path(out).resolve()),
            "version": meta["version"],
            "parent": parent,
            "labels": meta["labels"],
            "metrics": meta["metrics"],
        },
    )
    record = {k: v for k, v in entry.items() if k != "registry"}
    entry["registry"] = register(record, Path(entry["checkpoint"]), store)
    return entry
