"""The tumor decision and the scope verdict.

First the rule itself on hand-built model outputs (gateway.decision is pure):
every branch, could-not-judge included, and that the label always agrees with
`tumor_detected`. Then end to end through a real gateway on the tiny models:
a real head-CT slice and a real MRI slice made blank or coloured, and that
every response carries the scope field.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from gateway.decision import (
    NO_TUMOR,
    NOT_ASSESSED,
    Decision,
    DecisionParameters,
    Evidence,
    Scope,
    assess_scope,
    decide,
    passes_gate,
)
from gateway.errors import ContractError
from gateway.scope import BLANK, COLOUR_IMAGE, NOT_MRI, ScopeFlag, check_image, colour_fraction

PARAMS = DecisionParameters(gate=0.4, alone=0.6, strong=0.9, min_mask_fraction=0.01, scope_threshold=0.5,
                            detection_threshold=0.5)
TUMOR_CLASSES = ("glioma", "meningioma", "pituitary")


def probabilities(p_tumor: float, top: str = "meningioma") -> dict[str, float]:
    """p(no_tumor) = 1 - p_tumor, most of the tumor mass on `top`."""
    rest = [c for c in TUMOR_CLASSES if c != top]
    return {NO_TUMOR: 1.0 - p_tumor, top: 0.8 * p_tumor, rest[0]: 0.1 * p_tumor, rest[1]: 0.1 * p_tumor}


def judged(in_scope: float | None = 0.9):
    scope = assess_scope(in_scope, None, PARAMS)
    assert scope.assessed
    return scope


def decide_as_served(probs: dict[str, float], scope: Scope, evidence: Evidence, *, localization_asked: bool) -> Decision:
    """The gate asked once, then the decision, as gateway.pipeline does."""
    return decide(probs, scope, evidence, PARAMS, localization_asked=localization_asked,
                  gate_passed=passes_gate(probs, scope, PARAMS))


NOTHING = Evidence(mask_fraction=0.0, max_instance_score=None)
MASK = Evidence(mask_fraction=0.05, max_instance_score=None)
TINY_MASK = Evidence(mask_fraction=0.005, max_instance_score=None)
INSTANCE = Evidence(mask_fraction=None, max_instance_score=0.7)
WEAK_INSTANCE = Evidence(mask_fraction=None, max_instance_score=0.3)


@pytest.mark.parametrize(
    "p_tumor, evidence, asked, tumor",
    [
        (0.95, NOTHING, True, True),        # strong: the classifier alone suffices
        (0.90, Evidence(), True, True),     # at strong exactly
        (0.70, NOTHING, True, False),       # "meningioma 0.7" but U-Net and Mask R-CNN found nothing
        (0.70, TINY_MASK, True, False),     # a mask under min_mask_fraction is no evidence
        (0.70, MASK, True, True),           # gate + mask
        (0.70, INSTANCE, True, True),       # gate + instance
        (0.70, WEAK_INSTANCE, True, False), # an instance under the detection threshold is no evidence
        (0.40, MASK, True, True),           # at the gate exactly
        (0.39, MASK, True, False),          # below the gate, evidence or not (ungated runs found something)
        (0.39, Evidence(), True, False),    # gated: below the gate nothing ran
        (0.65, Evidence(), False, True),    # both skipped: p >= alone
        (0.55, Evidence(), False, False),   # both skipped: p < alone, though above the gate
    ],
)
def test_rule_in_scope(p_tumor: float, evidence: Evidence, asked: bool, tumor: bool) -> None:
    decision = decide_as_served(probabilities(p_tumor), judged(), evidence, localization_asked=asked)
    assert decision.tumor_detected is tumor
    assert decision.label == ("meningioma" if tumor else NO_TUMOR)
    assert decision.scope.assessed


def test_label_is_the_most_likely_tumor_class_even_when_no_tumor_is_the_argmax() -> None:
    p = {NO_TUMOR: 0.36, "glioma": 0.30, "meningioma": 0.04, "pituitary": 0.30 - 1e-3}
    decision = decide_as_served(p, judged(), MASK, localization_asked=True)
    assert decision.tumor_detected and decision.label == "glioma"


@pytest.mark.parametrize("in_scope", [0.0, 0.2, 0.4999])
def test_the_learned_scope_check_makes_a_slice_not_assessed(in_scope: float) -> None:
    scope = assess_scope(in_scope, None, PARAMS)
    assert not scope.assessed and scope.reason == NOT_MRI and scope.in_scope_probability == in_scope
    assert "CT" in scope.detail
    # even a certain tumor with every kind of evidence is not reported: could not judge, no finding
    decision = decide_as_served(probabilities(0.99), scope, Evidence(0.5, 0.99), localization_asked=True)
    assert not decision.tumor_detected and decision.label == NOT_ASSESSED
    assert not passes_gate(probabilities(0.99), scope, PARAMS)


def test_image_level_flags_come_first_and_keep_the_in_scope_probability() -> None:
    flag = ScopeFlag(BLANK, "blank frame")
    for in_scope in (None, 0.1, 0.99):
        scope = assess_scope(in_scope, flag, PARAMS)
        assert (scope.assessed, scope.reason, scope.detail, scope.in_scope_probability) == (False, BLANK, "blank frame", in_scope)
        assert decide_as_served(probabilities(0.99), scope, MASK, localization_asked=True).label == NOT_ASSESSED


def test_without_a_scope_output_only_the_image_checks_apply() -> None:
    scope = assess_scope(None, None, PARAMS)
    assert scope.assessed and scope.reason == "" and scope.in_scope_probability is None
    assert decide_as_served(probabilities(0.95), scope, NOTHING, localization_asked=True).tumor_detected


def test_localization_runs_at_the_gate_on_judged_slices_only() -> None:
    assert passes_gate(probabilities(0.4), judged(), PARAMS)
    assert not passes_gate(probabilities(0.39), judged(), PARAMS)


def test_the_label_always_agrees_with_the_decision() -> None:
    """Over a grid of outputs: a tumor class exactly when tumor_detected, not_assessed exactly when out of scope."""
    grid = itertools.product(
        np.linspace(0.0, 1.0, 21),
        TUMOR_CLASSES,
        (None, 0.1, 0.5, 0.9),
        (None, ScopeFlag(COLOUR_IMAGE, "colour")),
        (Evidence(), NOTHING, TINY_MASK, MASK, INSTANCE, WEAK_INSTANCE),
        (True, False),
    )
    for p_tumor, top, in_scope, flag, evidence, asked in grid:
        scope = assess_scope(in_scope, flag, PARAMS)
        decision = decide_as_served(probabilities(float(p_tumor), top), scope, evidence, localization_asked=asked)
        if not scope.assessed:
            assert decision.label == NOT_ASSESSED and not decision.tumor_detected
        elif decision.tumor_detected:
            assert decision.label == top
        else:
            assert decision.label == NO_TUMOR


def test_parameters_from_the_model_config_with_defaults_and_overrides() -> None:
    assert DecisionParameters.from_parameters({}) == DecisionParameters()
    assert DecisionParameters() == DecisionParameters(0.5, 0.5, 0.9, 0.002, 0.5)
    params = DecisionParameters.from_parameters(
        {"decision_gate": "0.3", "decision_strong": "0.97", "scope_threshold": "0.2", "input_size": "224"},
        {"decision_gate": 0.35, "decision_alone": None},
        detection_threshold=0.6,
        learned_scope=False,
    )
    assert (params.gate, params.alone, params.strong, params.scope_threshold) == (0.35, 0.5, 0.97, 0.2)
    assert params.detection_threshold == 0.6 and not params.learned_scope
    with pytest.raises(ContractError, match="decision_gate 0.95 is above decision_strong 0.9"):
        DecisionParameters.from_parameters({"decision_gate": "0.95"})
    with pytest.raises(ContractError, match="is not a number"):
        DecisionParameters.from_parameters({"scope_threshold": "high"})
    with pytest.raises(ContractError, match="outside"):
        DecisionParameters.from_parameters({"decision_alone": "1.5"})


# --- image-level checks on real slices ------------------------------------------------------------


@pytest.fixture(scope="module")
def mri_slice(data_root: Path) -> Path:
    return sorted((data_root / "sartaj-classification" / "Testing" / "glioma_tumor").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def ct_slice(data_root: Path) -> Path:
    return sorted((data_root / "head-ct" / "normal").glob("*.png"))[0]


def coloured(path: Path) -> bytes:
    ok, data = cv2.imencode(".png", cv2.applyColorMap(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), cv2.COLORMAP_JET))
    assert ok
    return data.tobytes()


def blank_like(path: Path) -> bytes:
    """The MRI slice's frame with its content gone: black with half a gray level of noise."""
    height, width = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape
    noise = np.random.default_rng(0).integers(0, 2, (height, width), dtype=np.uint8)
    ok, data = cv2.imencode(".png", noise)
    assert ok
    return data.tobytes()


def test_image_checks_on_a_real_slice_its_colour_rendering_and_a_blank_frame(mri_slice: Path) -> None:
    from gateway.preprocessing import decode_image

    real = decode_image(mri_slice.read_bytes())
    assert check_image(real.pixels, real.colour_fraction) is None
    rendering = decode_image(coloured(mri_slice))
    assert rendering.colour_fraction > 0.5
    assert check_image(rendering.pixels, rendering.colour_fraction).reason == COLOUR_IMAGE
    blank = decode_image(blank_like(mri_slice))
    assert check_image(blank.pixels, blank.colour_fraction).reason == BLANK
    gray_as_rgb = np.repeat(cv2.imread(str(mri_slice), cv2.IMREAD_GRAYSCALE)[..., None], 3, axis=2)
    assert colour_fraction(gray_as_rgb) == 0.0


# --- end to end -------------------------------------------------------------------------------------


def test_scope_end_to_end_through_the_gateway(embedded_gateway, mri_slice: Path, ct_slice: Path) -> None:
    """The tiny models are random, so which verdict the learned check gives is not asserted; that the
    response carries it, consistently with the label and the decision, is."""
    from brainscan import Client

    with Client(embedded_gateway.address) as client:
        info = client.model_info()
        results = {
            "mri": client.analyze(mri_slice),
            "ct": client.analyze(ct_slice),
            "colour": client.analyze(coloured(mri_slice)),
            "blank": client.analyze(blank_like(mri_slice), gate=False),
        }
    assert info.decision.learned_scope_check  # the tiny classifier has the in_scope output
    assert info.tumor_threshold == pytest.approx(info.decision.gate)
    for name, result in results.items():
        scope = result.scope
        assert scope.in_scope_probability is not None and 0.0 <= scope.in_scope_probability <= 1.0, name
        learned_says_in = scope.in_scope_probability >= info.decision.scope_threshold
        if scope.assessed:
            assert scope.reason == "" and learned_says_in and result.label != "not_assessed", name
            assert (result.label != "no_tumor") == result.tumor_detected, name
        else:
            assert result.label == "not_assessed" and not result.tumor_detected, name
            assert scope.reason and scope.detail, name
    assert results["colour"].scope.reason == COLOUR_IMAGE
    assert results["blank"].scope.reason == BLANK
    # ungated, the models still ran on the blank frame, but no finding is reported
    assert results["blank"].segmentation_ran and results["blank"].detection_ran
    # gated, a slice that cannot be judged never reaches the U-Net or the Mask R-CNN
    assert not results["colour"].segmentation_ran and not results["colour"].detection_ran
    for name in ("mri", "ct"):
        result = results[name]
        if not result.scope.assessed:
            assert result.scope.reason == NOT_MRI and not result.segmentation_ran, name


@pytest.fixture(scope="module")
def strict_scope_gateway(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny models with BRAINSCAN_SCOPE_THRESHOLD=1: the learned check (a sigmoid, below 1) flags every slice."""
    from tests.conftest import start_gateway, stop_gateway

    gateway = start_gateway(tiny_repository, tmp_path_factory.mktemp("logs"), env={"BRAINSCAN_SCOPE_THRESHOLD": "1.0"})
    yield gateway
    stop_gateway(gateway)


def test_a_head_ct_the_learned_check_rejects_is_not_assessed(strict_scope_gateway, ct_slice: Path) -> None:
    import grpc

    from brainscan import Client
    from brainscan_proto.v1 import brainscan_pb2 as pb
    from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc

    with Client(strict_scope_gateway.address) as client:
        assert client.model_info().decision.scope_threshold == 1.0  # the environment override
        result = client.analyze(ct_slice)
    with grpc.insecure_channel(strict_scope_gateway.address) as channel:  # the wire message itself
        response = pb_grpc.BrainScanStub(channel).Analyze(pb.AnalyzeRequest(encoded=ct_slice.read_bytes()), timeout=30)
    assert (result.scope.assessed, result.scope.reason) == (False, NOT_MRI)
    assert result.label == "not_assessed" and not result.tumor_detected
    assert not result.segmentation_ran and not result.detection_ran and result.mask is None and result.instances == ()
    assert response.HasField("scope") and response.scope.reason == NOT_MRI
    assert response.scope.HasField("in_scope_probability")


@pytest.fixture(scope="module")
def single_output_repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny repository with the classifier as export wrote it before the scope head: no `in_scope` output."""
    import shutil

    import onnx

    from gateway.contract import load_model_spec

    target = tmp_path_factory.mktemp("single_output") / "repository"
    shutil.copytree(tiny_repository, target)
    spec = load_model_spec(target / "classifier")
    model = onnx.load(str(spec.onnx_path))
    kept = [o for o in model.graph.output if o.name != "in_scope"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(spec.onnx_path))
    config = (target / "classifier" / "config.pbtxt").read_text()
    start = config.index('output {\n  name: "in_scope"')
    end = config.index("}\n", start) + 2
    (target / "classifier" / "config.pbtxt").write_text(config[:start] + config[end:])
    return target


def test_a_classifier_without_the_scope_output_is_served_with_the_image_checks_only(
    single_output_repository: Path, tmp_path: Path, mri_slice: Path
) -> None:
    from brainscan import Client
    from tests.conftest import start_gateway, stop_gateway

    gateway = start_gateway(single_output_repository, tmp_path)
    try:
        with Client(gateway.address) as client:
            info = client.model_info()
            result = client.analyze(mri_slice)
            colour = client.analyze(coloured(mri_slice))
    finally:
        stop_gateway(gateway)
    assert not info.decision.learned_scope_check
    assert result.scope.assessed and result.scope.in_scope_probability is None
    assert (result.label != "no_tumor") == result.tumor_detected
    assert colour.scope.reason == COLOUR_IMAGE and colour.label == "not_assessed"


def test_cli_shows_the_scope_and_the_thresholds(embedded_gateway, mri_slice: Path, tmp_path: Path) -> None:
    from tests.test_cli_and_server import brainscan

    path = tmp_path / "colour.png"
    path.write_bytes(coloured(mri_slice))
    table = brainscan("analyze", str(path), "--server", embedded_gateway.address)
    assert table.returncode == 0, table.stderr
    assert "label: not_assessed" in table.stdout and "not assessed (colour_image):" in table.stdout
    info = brainscan("info", "--server", embedded_gateway.address)
    assert info.returncode == 0, info.stderr
    assert "decision: tumor when p(tumor) >= 0.9, or >= 0.5 with a U-Net mask >= 0.002" in info.stdout
    assert "learned check: classifier in_scope >= 0.5" in info.stdout
