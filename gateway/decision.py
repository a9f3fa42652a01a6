"""The one answer per slice: could it be judged, is there a tumor, which kind.

Pure (no gRPC, no models): the pipeline calls `decide` once per slice with
what the models returned. The rule (README "How the answer is decided"):

1. Scope. The slice is not judged when an image-level check flags it
   (gateway/scope.py: blank, colour image) or when the classifier's `in_scope`
   output is below `scope_threshold` (`ct_or_not_mri`: a CT, another body part,
   a frame that is not an MRI slice). Then `tumor_detected` is false and the
   label is `not_assessed`, never `no_tumor`: "could not judge" and "no tumor"
   stay apart. A classifier without the `in_scope` output has no learned check;
   only the image-level checks apply.
2. Tumor. With p = 1 - p(no_tumor):
   - when the client asked for a localization model (U-Net or Mask R-CNN):
     tumor = p >= strong, or the slice passed the gate (p >= gate, decided once
     per slice by `passes_gate`) and there is localized evidence, where evidence
     is a U-Net mask (its regions under the U-Net's min_component_px already
     dropped) covering >= min_mask_fraction of the U-Net's input grid or
     any Mask R-CNN instance scoring >= the detection threshold. Gated, those
     models run only when p >= gate, so gated and ungated answers agree;
   - when the client skipped both: tumor = p >= alone.
3. Label: the most likely tumor class when tumor, else `no_tumor`.

The operating points are the classifier's config.pbtxt parameters, chosen by
export on validation data; `DecisionParameters.from_parameters` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import ContractError
from gateway.scope import NOT_MRI, ScopeFlag

NO_TUMOR = "no_tumor"
NOT_ASSESSED = "not_assessed"

# config.pbtxt parameter → DecisionParameters field; used when the parameter is absent
PARAMETER_DEFAULTS: dict[str, float] = {
    "decision_gate": 0.5,
    "decision_alone": 0.5,
    "decision_strong": 0.9,
    "decision_min_mask_fraction": 0.002,
    "scope_threshold": 0.5,
}


@dataclass(frozen=True)
class DecisionParameters:
    gate: float = PARAMETER_DEFAULTS["decision_gate"]
    alone: float = PARAMETER_DEFAULTS["decision_alone"]
    strong: float = PARAMETER_DEFAULTS["decision_strong"]
    min_mask_fraction: float = PARAMETER_DEFAULTS["decision_min_mask_fraction"]
    scope_threshold: float = PARAMETER_DEFAULTS["scope_threshold"]
    detection_threshold: float = 0.5  # the gateway's Mask R-CNN score threshold
    learned_scope: bool = True  # the classifier has the `in_scope` output

    def __post_init__(self) -> None:
        for name in ("gate", "alone", "strong", "min_mask_fraction", "scope_threshold", "detection_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ContractError(f"decision parameter {name} = {value} is outside [0, 1]")
        if self.gate > self.strong:
            raise ContractError(
                f"decision_gate {self.gate} is above decision_strong {self.strong}: "
                "a slice the classifier alone calls a tumor would never reach the localization models"
            )

    @classmethod
    def from_parameters(
        cls,
        parameters: Mapping[str, str],
        overrides: Mapping[str, float | None] | None = None,
        *,
        detection_threshold: float = 0.5,
        learned_scope: bool = True,
    ) -> DecisionParameters:
        """From config.pbtxt `parameters` (strings), defaults where absent, then non-None `overrides`
        (keys as in PARAMETER_DEFAULTS)."""
        values: dict[str, float] = {}
        for key, default in PARAMETER_DEFAULTS.items():
            raw = parameters.get(key)
            try:
                values[key] = default if raw in (None, "") else float(raw)
            except ValueError:
                raise ContractError(f"classifier parameter {key}={raw!r} is not a number") from None
            override = (overrides or {}).get(key)
            if override is not None:
                values[key] = float(override)
        return cls(
            gate=values["decision_gate"],
            alone=values["decision_alone"],
            strong=values["decision_strong"],
            min_mask_fraction=values["decision_min_mask_fraction"],
            scope_threshold=values["scope_threshold"],
            detection_threshold=detection_threshold,
            learned_scope=learned_scope,
        )


@dataclass(frozen=True)
class Scope:
    assessed: bool
    reason: str = ""  # "" when assessed; else a gateway.scope reason code
    detail: str = ""
    in_scope_probability: float | None = None  # None: the classifier has no scope output


@dataclass(frozen=True)
class Evidence:
    """What the localization models found; None = that model did not run."""

    mask_fraction: float | None = None  # U-Net tumor pixels / U-Net input pixels, on the model grid
    max_instance_score: float | None = None  # best Mask R-CNN instance score; None = none found or not run


@dataclass(frozen=True)
class Decision:
    tumor_detected: bool
    label: str
    scope: Scope


def tumor_probability(probabilities: Mapping[str, float]) -> float:
    return 1.0 - probabilities[NO_TUMOR]


def assess_scope(in_scope: float | None, image_flag: ScopeFlag | None, params: DecisionParameters) -> Scope:
    """Image-level flags first (they say more precisely what is wrong), then the learned check."""
    if image_flag is not None:
        return Scope(False, image_flag.reason, image_flag.detail, in_scope)
    if in_scope is not None and in_scope < params.scope_threshold:
        return Scope(
            False,
            NOT_MRI,
            f"not a brain MRI slice these models can judge (p = {in_scope:.3f} < {params.scope_threshold:g}): "
            "a CT, another body part, a frame with no brain tissue in view, or not a medical image",
            in_scope,
        )
    return Scope(True, "", "", in_scope)


def passes_gate(probabilities: Mapping[str, float], scope: Scope, params: DecisionParameters) -> bool:
    """A judged slice with p(tumor) >= gate: gated requests run the U-Net / Mask R-CNN only on these, and
    only these can be a tumor on localized evidence. The pipeline asks once per slice and hands the answer
    to `decide`."""
    return scope.assessed and tumor_probability(probabilities) >= params.gate


def decide(
    probabilities: Mapping[str, float],
    scope: Scope,
    evidence: Evidence,
    params: DecisionParameters,
    *,
    localization_asked: bool,
    gate_passed: bool,
) -> Decision:
    """The rule in the module docstring; `localization_asked`: the client did not skip both the U-Net and
    the Mask R-CNN (gated requests count as asked even when the gate kept them from running);
    `gate_passed`: `passes_gate` for this slice."""
    if not scope.assessed:
        return Decision(False, NOT_ASSESSED, scope)
    p = tumor_probability(probabilities)
    if localization_asked:
        tumor = p >= params.strong or (gate_passed and has_evidence(evidence, params))
    else:
        tumor = p >= params.alone
    return Decision(tumor, tumor_label(probabilities) if tumor else NO_TUMOR, scope)


def has_evidence(evidence: Evidence, params: DecisionParameters) -> bool:
    fraction = evidence.mask_fraction
    mask = fraction is not None and fraction > 0.0 and fraction >= params.min_mask_fraction
    instance = evidence.max_instance_score is not None and evidence.max_instance_score >= params.detection_threshold
    return mask or instance


def tumor_label(probabilities: Mapping[str, float]) -> str:
    """The most likely tumor class (plain argmax could say no_tumor at 0.36 while p(tumor) = 0.64)."""
    tumor_classes = {k: v for k, v in probabilities.items() if k != NO_TUMOR}
    return max(tumor_classes, key=tumor_classes.__getitem__)
