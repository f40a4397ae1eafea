"""How sensitive each layer is to quantization: Hessian traces and exact inter-layer terms."""

from .analyze import SensitivityConfig, check_predictions, compute_sensitivity
from .artifact import Sensitivity

__all__ = ["Sensitivity", "SensitivityConfig", "check_predictions", "compute_sensitivity"]
