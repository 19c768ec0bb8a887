"""delta-influence's framework-free core: attacks, Δ-Influence and the other detectors, the audit, the correction
loop. Nothing here imports Lightning or W&B except ``delta_influence.lightning``, the front door of the Lightning
layer (the callback, the modules, the data modules, the unlearning methods and the command line)."""

from delta_influence.audit import AuditData, AuditError, AuditResult, QueryChoice, run_audit
from delta_influence.collapse import CollapseResult, flag_collapsed
from delta_influence.correction import Correction, CorrectionError, CorrectionResult, CorrectiveFit, FitReport
from delta_influence.detectors import DeltaInfluence, Detector
from delta_influence.metrics import detection_metrics
from delta_influence.queries import TRANSFORMS, QuerySet, make_queries
from delta_influence.second_opinion import SecondOpinion
from delta_influence.verification import Verification

__all__ = [
    "TRANSFORMS",
    "AuditData",
    "AuditError",
    "AuditResult",
    "CollapseResult",
    "Correction",
    "CorrectionError",
    "CorrectionResult",
    "CorrectiveFit",
    "DeltaInfluence",
    "Detector",
    "FitReport",
    "QueryChoice",
    "QuerySet",
    "SecondOpinion",
    "Verification",
    "detection_metrics",
    "flag_collapsed",
    "make_queries",
    "run_audit",
]
