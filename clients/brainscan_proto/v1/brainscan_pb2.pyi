from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RawPixels(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class AnalyzeOptions(_message.Message):
    __slots__ = ("skip_segmentation", "skip_detection", "ungated")
    SKIP_SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    SKIP_DETECTION_FIELD_NUMBER: _ClassVar[int]
    UNGATED_FIELD_NUMBER: _ClassVar[int]
    skip_segmentation: bool
    skip_detection: bool
    ungated: bool
    def __init__(self, skip_segmentation: bool = ..., skip_detection: bool = ..., ungated: bool = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("encoded", "raw", "options", "image_id")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawPixels
    options: AnalyzeOptions
    image_id: str
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawPixels, _Mapping]] = ..., options: _Optional[_Union[AnalyzeOptions, _Mapping]] = ..., image_id: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("left", "top", "width", "height", "png")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    left: int
    top: int
    width: int
    height: int
    png: bytes
    def __init__(self, left: _Optional[int] = ..., top: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., png: _Optional[bytes] = ...) -> None: ...

class Segmentation(_message.Message):
    __slots__ = ("mask", "area_px", "bbox", "area_mm2")
    MASK_FIELD_NUMBER: _ClassVar[int]
    AREA_PX_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    mask: Mask
    area_px: int
    bbox: Box
    area_mm2: float
    def __init__(self, mask: _Optional[_Union[Mask, _Mapping]] = ..., area_px: _Optional[int] = ..., bbox: _Optional[_Union[Box, _Mapping]] = ..., area_mm2: _Optional[float] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("box", "score", "mask", "area_px", "area_mm2")
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    AREA_PX_FIELD_NUMBER: _ClassVar[int]
    AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    box: Box
    score: float
    mask: Mask
    area_px: int
    area_mm2: float
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., mask: _Optional[_Union[Mask, _Mapping]] = ..., area_px: _Optional[int] = ..., area_mm2: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Scope(_message.Message):
    __slots__ = ("assessed", "reason", "detail", "in_scope_probability")
    ASSESSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    IN_SCOPE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    assessed: bool
    reason: str
    detail: str
    in_scope_probability: float
    def __init__(self, assessed: bool = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., in_scope_probability: _Optional[float] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("image_id", "label", "probabilities", "tumor_probability", "tumor_detected", "segmentation", "instances", "model_versions", "timings_ms", "image_width", "image_height", "segmentation_ran", "detection_ran", "error", "frame", "scope")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TUMOR_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TUMOR_DETECTED_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_RAN_FIELD_NUMBER: _ClassVar[int]
    DETECTION_RAN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    label: str
    probabilities: _containers.ScalarMap[str, float]
    tumor_probability: float
    tumor_detected: bool
    segmentation: Segmentation
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    model_versions: _containers.ScalarMap[str, str]
    timings_ms: _containers.ScalarMap[str, float]
    image_width: int
    image_height: int
    segmentation_ran: bool
    detection_ran: bool
    error: Error
    frame: int
    scope: Scope
    def __init__(self, image_id: _Optional[str] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., tumor_probability: _Optional[float] = ..., tumor_detected: bool = ..., segmentation: _Optional[_Union[Segmentation, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., model_versions: _Optional[_Mapping[str, str]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., segmentation_ran: bool = ..., detection_ran: bool = ..., error: _Optional[_Union[Error, _Mapping]] = ..., frame: _Optional[int] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "role", "labels", "input_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    role: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input_size: _Optional[int] = ...) -> None: ...

class DecisionInfo(_message.Message):
    __slots__ = ("gate", "alone", "strong", "min_mask_fraction", "scope_threshold", "learned_scope_check")
    GATE_FIELD_NUMBER: _ClassVar[int]
    ALONE_FIELD_NUMBER: _ClassVar[int]
    STRONG_FIELD_NUMBER: _ClassVar[int]
    MIN_MASK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LEARNED_SCOPE_CHECK_FIELD_NUMBER: _ClassVar[int]
    gate: float
    alone: float
    strong: float
    min_mask_fraction: float
    scope_threshold: float
    learned_scope_check: bool
    def __init__(self, gate: _Optional[float] = ..., alone: _Optional[float] = ..., strong: _Optional[float] = ..., min_mask_fraction: _Optional[float] = ..., scope_threshold: _Optional[float] = ..., learned_scope_check: bool = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("models", "backend", "tumor_threshold", "mask_threshold", "detection_threshold", "disclaimer", "unet_min_component_px", "decision")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TUMOR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MASK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DETECTION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DISCLAIMER_FIELD_NUMBER: _ClassVar[int]
    UNET_MIN_COMPONENT_PX_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    backend: str
    tumor_threshold: float
    mask_threshold: float
    detection_threshold: float
    disclaimer: str
    unet_min_component_px: int
    decision: DecisionInfo
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., backend: _Optional[str] = ..., tumor_threshold: _Optional[float] = ..., mask_threshold: _Optional[float] = ..., detection_threshold: _Optional[float] = ..., disclaimer: _Optional[str] = ..., unet_min_component_px: _Optional[int] = ..., decision: _Optional[_Union[DecisionInfo, _Mapping]] = ...) -> None: ...

class SeriesOptions(_message.Message):
    __slots__ = ("analysis", "group_series", "dicom_seg", "dicom_sr")
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SERIES_FIELD_NUMBER: _ClassVar[int]
    DICOM_SEG_FIELD_NUMBER: _ClassVar[int]
    DICOM_SR_FIELD_NUMBER: _ClassVar[int]
    analysis: AnalyzeOptions
    group_series: bool
    dicom_seg: bool
    dicom_sr: bool
    def __init__(self, analysis: _Optional[_Union[AnalyzeOptions, _Mapping]] = ..., group_series: bool = ..., dicom_seg: bool = ..., dicom_sr: bool = ...) -> None: ...

class AnalyzeSeriesRequest(_message.Message):
    __slots__ = ("dicom", "file_id", "options")
    DICOM_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    dicom: bytes
    file_id: str
    options: SeriesOptions
    def __init__(self, dicom: _Optional[bytes] = ..., file_id: _Optional[str] = ..., options: _Optional[_Union[SeriesOptions, _Mapping]] = ...) -> None: ...

class SeriesSlice(_message.Message):
    __slots__ = ("file_id", "frame", "sop_instance_uid", "position_mm", "thickness_mm", "result")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    POSITION_MM_FIELD_NUMBER: _ClassVar[int]
    THICKNESS_MM_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    frame: int
    sop_instance_uid: str
    position_mm: float
    thickness_mm: float
    result: AnalyzeResponse
    def __init__(self, file_id: _Optional[str] = ..., frame: _Optional[int] = ..., sop_instance_uid: _Optional[str] = ..., position_mm: _Optional[float] = ..., thickness_mm: _Optional[float] = ..., result: _Optional[_Union[AnalyzeResponse, _Mapping]] = ...) -> None: ...

class SeriesResult(_message.Message):
    __slots__ = ("series_instance_uid", "error", "label", "slices", "tumor_slices", "largest_cross_section_mm2", "volume_ml", "slice_distance_mm", "ordered_by", "notes", "model_versions", "dicom_seg", "dicom_sr")
    class ModelVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    TUMOR_SLICES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_CROSS_SECTION_MM2_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ML_FIELD_NUMBER: _ClassVar[int]
    SLICE_DISTANCE_MM_FIELD_NUMBER: _ClassVar[int]
    ORDERED_BY_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DICOM_SEG_FIELD_NUMBER: _ClassVar[int]
    DICOM_SR_FIELD_NUMBER: _ClassVar[int]
    series_instance_uid: str
    error: Error
    label: str
    slices: _containers.RepeatedCompositeFieldContainer[SeriesSlice]
    tumor_slices: _containers.RepeatedScalarFieldContainer[int]
    largest_cross_section_mm2: float
    volume_ml: float
    slice_distance_mm: float
    ordered_by: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    model_versions: _containers.ScalarMap[str, str]
    dicom_seg: bytes
    dicom_sr: bytes
    def __init__(self, series_instance_uid: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., label: _Optional[str] = ..., slices: _Optional[_Iterable[_Union[SeriesSlice, _Mapping]]] = ..., tumor_slices: _Optional[_Iterable[int]] = ..., largest_cross_section_mm2: _Optional[float] = ..., volume_ml: _Optional[float] = ..., slice_distance_mm: _Optional[float] = ..., ordered_by: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., model_versions: _Optional[_Mapping[str, str]] = ..., dicom_seg: _Optional[bytes] = ..., dicom_sr: _Optional[bytes] = ...) -> None: ...

class SkippedFile(_message.Message):
    __slots__ = ("file_id", "reason")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    reason: str
    def __init__(self, file_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AnalyzeSeriesResponse(_message.Message):
    __slots__ = ("series", "skipped", "disclaimer")
    SERIES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DISCLAIMER_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[SeriesResult]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedFile]
    disclaimer: str
    def __init__(self, series: _Optional[_Iterable[_Union[SeriesResult, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedFile, _Mapping]]] = ..., disclaimer: _Optional[str] = ...) -> None: ...
