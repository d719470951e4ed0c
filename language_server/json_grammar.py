"""A JSON schema -> the EBNF grammar that constrains generation to it (xgrammar), compact.

Shared by the HTTP process (tool calls and schemas inside structural tags) and the engine
(json_schema and json_object constraints), so both hold JSON to the same rules:
- no free whitespace (OpenAI's strict mode writes compact JSON; where any whitespace is allowed,
  a model can pad forever);
- strings with minLength/maxLength exclude raw control characters, as JSON requires. xgrammar
  0.2.9 lowers a length-bounded string to `[^"\\\r\n]{m,n}`, which lets U+0000–U+001F through
  (mlc-ai/xgrammar#800, fix proposed in #880); the tiny random model writes them, and
  json.loads then refuses the answer. The class is patched in the generated grammar. Escapes
  inside such strings stay unreachable until xgrammar's fix lands.
"""

from __future__ import annotations

# The bounded-length string class xgrammar writes, and the one JSON allows (its unbounded strings').
_LOOSE_CLASS = r"[^\"\\\r\n]"
_JSON_CLASS = r"[^\0-\x1f\"\\\r\n]"


def json_schema_grammar(schema: str) -> str:
    """EBNF for a JSON schema's text (raises xgrammar's errors for a schema it cannot enforce)."""
    import xgrammar as xgr  # the engine loads it only for its first constrained request

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    return str(grammar).replace(_LOOSE_CLASS, _JSON_CLASS)
