"""The controlled credit-assignment environment (`env=credit`, docs/credit_env.md): gates whose right door a note
named earlier, distractor turns that do not matter, an additive delayed outcome, and each step's exact credit."""
from stepopsd.envs.credit.credit import (CreditState, StepCredit, advance, credit_records, exact_advantage, is_pivotal,
                                         right_action, start)

__all__ = ["CreditState", "StepCredit", "advance", "credit_records", "exact_advantage", "is_pivotal", "right_action",
           "start"]
