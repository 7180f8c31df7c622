"""Pure decisions of the policy layer: names, start, schedule, retention, options.

Nothing here touches files or arrays: every function works on names, listings and numbers,
so every decision is covered by property tests (tests/test_policy.py).
"""

from .naming import (
    LATEST_NAME,
    LOCK_NAME,
    RUN_PREFIX,
    STEP_PREFIX,
    TEMP_PREFIX,
    TRASH_PREFIX,
    Listing,
    classify,
    format_run,
    format_step,
    parse_run,
    parse_step,
)
from .options import BEST_MODES, ON_EXISTING, RESUME_MODES, ManagerConfig, make_config
from .retention import metric_value, retain, to_delete
from .schedule import SaveDecision, should_save
from .start import StartPlan, next_run, plan_start

__all__ = [
    "LATEST_NAME", "LOCK_NAME", "RUN_PREFIX", "STEP_PREFIX", "TEMP_PREFIX", "TRASH_PREFIX",
    "Listing", "classify", "format_run", "format_step", "parse_run", "parse_step",
    "BEST_MODES", "ON_EXISTING", "RESUME_MODES", "ManagerConfig", "make_config",
    "metric_value", "retain", "to_delete", "SaveDecision", "should_save",
    "StartPlan", "next_run", "plan_start",
]
