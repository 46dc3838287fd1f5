"""schemathesis hooks of tests/integration/test_controlplane_schemathesis.py (``SCHEMATHESIS_HOOKS``).

A page token is opaque: only a ``next_page_token`` the API returned is one (the schema says so, and a
made-up token of the right form is refused with a documented 422). A token drawn from the pattern in a
positive (schema-valid) case is never one the server issued, so the positive case goes without it;
negative cases still send malformed tokens. (The rating session's ``page_token`` is an offset, any value
of its pattern is valid: it is kept.)
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def before_call(context: Any, case: Any, **kwargs: Any) -> None:
    meta = getattr(case, "meta", None)
    positive = meta is not None and meta.generation.mode.is_positive
    offset = case.operation.path.endswith("/rating-session")
    if positive and not offset and case.query and "page_token" in case.query:
        del case.query["page_token"]
