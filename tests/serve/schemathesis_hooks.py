"""Schemathesis hooks for `maxlm serve` (the repository root's schemathesis.toml loads them): the one schema-valid
completions body the server may refuse is one whose prompt and max_tokens together overflow the context, a rule
across fields that JSON Schema cannot state (HTTP 400, code "context_length_exceeded"). The config lets
positive_data_acceptance take a 400 there; this check fails every other 400 to a schema-valid body."""

import schemathesis
from schemathesis.specs.openapi.checks import is_unexpected_http_status_case

COMPLETIONS = "POST /v1/completions"


@schemathesis.check
def valid_completion_refused_only_for_context_overflow(ctx, response, case):
  """A 400 to a schema-valid POST /v1/completions body must be code context_length_exceeded."""
  meta = case.meta
  if (case.operation.label != COMPLETIONS or response.status_code != 400 or meta is None
      or not meta.generation.mode.is_positive or is_unexpected_http_status_case(case)):
    return None
  try:
    code = response.json()["error"]["code"]
  except (ValueError, KeyError, TypeError):
    code = None
  if code != "context_length_exceeded":
    raise AssertionError(f"a schema-valid body was refused: {response.text[:500]}")
  return None
