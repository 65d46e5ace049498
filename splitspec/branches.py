"""Which drafted branch a verdict selects: the one rule that the coordinator (which branch the
draft goes on from) and the target (which planned round it chains) must both apply."""

from __future__ import annotations

from typing import Any, Sequence


def matching_branch(branches: Sequence[Any], verdict: Any) -> int | None:
    """Index of the branch drafted for `verdict` (its accepted count and its recovered or bonus
    token), or None. `branches`: DraftBranch or VerifyBranch messages; `verdict`: a VerifyResponse."""
    return next((index for index, branch in enumerate(branches)
                 if branch.num_accepted == verdict.num_accepted and branch.token_id == verdict.token_id), None)
