"""flask_llmauth: LiteLLM-style authentication and authorization for Flask LLM gateways."""

from __future__ import annotations

from . import signals
from .authz.decorators import (
    allowed_models,
    check_model_access,
    require_model_access,
    require_role,
    require_scope,
)
from .config import Settings
from .errors import (
    BadRequest,
    BudgetExceeded,
    ConfigurationError,
    Forbidden,
    LLMAuthError,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthenticated,
)
from .extension import LLMAuth, LLMAuthState
from .guards import Admission, Guard, current_admission, record_usage
from .principal import Principal, Role, current_principal, get_principal
from .usage import Usage

__all__ = [
    "Admission",
    "Guard",
    "Usage",
    "current_admission",
    "record_usage",
    "BadRequest",
    "BudgetExceeded",
    "ConfigurationError",
    "Forbidden",
    "LLMAuth",
    "LLMAuthError",
    "LLMAuthState",
    "NotFound",
    "Principal",
    "Role",
    "ServiceUnavailable",
    "Settings",
    "TooManyRequests",
    "Unauthenticated",
    "allowed_models",
    "check_model_access",
    "current_principal",
    "get_principal",
    "require_model_access",
    "require_role",
    "require_scope",
    "signals",
]
__version__ = "0.1.0"
