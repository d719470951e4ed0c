"""What a request asks its output to match -> one `Constraint` for the engine, checked here.

Sources, at most one per request: `response_format` (json_object, json_schema), vLLM's
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, and `tool_choice` "required"
or a named function (the model must call a tool: its calls are constrained to the functions'
parameter schemas). Each is parsed here with xgrammar, without the tokenizer, so a bad schema,
regex or grammar is a 400 naming its parameter before any engine work; the engine compiles the
constraint against the vocabulary on its own threads (language_server/engine/grammar.py).

When the output starts with reasoning (`<think>…</think>`), the constraint applies only after
`</think>`: it is wrapped in a structural tag whose first part is free text up to `</think>`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import xgrammar as xgr
from xgrammar.structural_tag import (
    AnyTextFormat,
    ConstStringFormat,
    GrammarFormat,
    JSONSchemaFormat,
    OptionalFormat,
    RegexFormat,
    SequenceFormat,
    TagFormat,
    TagsWithSeparatorFormat,
)

from language_server.api.errors import bad_request
from language_server.api.schemas import ChatCompletionRequest, NamedToolChoice, SamplingFields
from language_server.json_grammar import json_schema_grammar
from language_server.protocol import Constraint

# A constraint's text (schema JSON, regex, grammar) beyond this is refused: parsing and compiling
# grow with it, and no real schema comes close.
MAX_SOURCE_CHARS = 100_000
THINK_BEGIN, THINK_END = "<think>", "</think>"
# A Qwen3 tool call as its chat template asks for it (and as xgrammar's Qwen3 tag writes it).
CALL_BEGIN, CALL_END = '<tool_call>\n{{"name": "{name}", "arguments": ', "}\n</tool_call>"

# xgrammar prefixes its C++ errors with a time and a source position; the client needs neither.
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def request_constraint(
    req: SamplingFields, *, in_reasoning: bool = False, reasoning: bool = False
) -> Constraint | None:
    """The request's constraint, or None. `reasoning`: the output may open with a think block
    (`in_reasoning`: it starts inside one, the prompt having opened it). CPU work for a large
    schema: callers run it off the event loop."""
    sources = _given_sources(req)
    if not sources:
        return None
    if len(sources) > 1:
        raise bad_request(
            f"Give one of {', '.join(sources)}: each constrains the whole output.",
            param=sources[1],
            code="invalid_value",
        )
    param = sources[0]
    if param == "tool_choice":
        choice = req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()
        return tool_constraint(
            [tool.model_dump(exclude_none=True) for tool in req.tools],
            choice,
            req.parallel_tool_calls is not False,
            in_reasoning=in_reasoning,
            reasoning=reasoning,
        )
    kind, source, fmt = _constraint_of(req, param)
    if len(source) > MAX_SOURCE_CHARS:
        raise bad_request(f"{param} is {len(source):,} characters; the limit is {MAX_SOURCE_CHARS:,}.", param=param)
    _parse(kind, source, param)
    if not (reasoning or in_reasoning):
        return Constraint(kind, source)
    tag = xgr.StructuralTag(format=SequenceFormat(elements=[_reasoning_prefix(in_reasoning), fmt]))
    return Constraint("structural_tag", _compact_json(tag.model_dump_json()))


def _reasoning_prefix(in_reasoning: bool) -> Any:
    """Free text up to `</think>` and Qwen's blank line after it: the rest of a block the prompt
    opened, or an optional whole block (as xgrammar builds it for Qwen3's tool calls)."""
    block = SequenceFormat(
        elements=[
            TagFormat(
                begin="" if in_reasoning else THINK_BEGIN,
                content=AnyTextFormat(excludes=[THINK_BEGIN, THINK_END]),
                end=THINK_END,
            ),
            ConstStringFormat(value="\n\n"),
        ]
    )
    return block if in_reasoning else OptionalFormat(content=block)


def tool_constraint(
    tools: list[dict], tool_choice: str | dict, parallel: bool, *, in_reasoning: bool, reasoning: bool
) -> Constraint:
    """`tool_choice` "required" or a named function: nothing but Qwen3's `<tool_call>` blocks
    (one for a named function or with parallel calls off; one or more, a newline apart,
    otherwise), each call's arguments held to its function's parameter schema. Only calls: the
    output ends after the last one, as OpenAI's required mode does."""
    if isinstance(tool_choice, dict):
        tools = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    calls = [
        TagFormat(
            begin=CALL_BEGIN.format(name=tool["function"]["name"]),
            content=JSONSchemaFormat(json_schema=tool["function"].get("parameters") or {"type": "object"}),
            end=CALL_END,
        )
        for tool in tools
    ]
    fmt: Any = (
        calls[0]
        if isinstance(tool_choice, dict)
        else TagsWithSeparatorFormat(tags=calls, separator="\n", at_least_one=True, stop_after_first=not parallel)
    )
    if in_reasoning or reasoning:
        fmt = SequenceFormat(elements=[_reasoning_prefix(in_reasoning), fmt])
    try:
        return Constraint("structural_tag", _compact_json(xgr.StructuralTag(format=fmt).model_dump_json()))
    except (ValueError, RuntimeError) as exc:
        raise bad_request(f"The tools cannot be enforced: {_clean(exc)}", param="tools") from None


def check_tools(req: ChatCompletionRequest) -> None:
    """Tool definitions and tool_choice that make sense together; each parameters schema parses."""
    if req.tools is None:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(req, name) is not None and getattr(req, name) != "none":
                raise bad_request(f"{name} needs tools.", param=name)
        return
    names = [tool.function.name for tool in req.tools]
    for i, tool in enumerate(req.tools):
        if names.index(tool.function.name) != i:
            raise bad_request(f"Two tools are named {tool.function.name!r}.", param=f"tools[{i}].function.name")
        if tool.function.parameters is not None:
            _parse("json_schema", json.dumps(tool.function.parameters), f"tools[{i}].function.parameters")
    if isinstance(req.tool_choice, NamedToolChoice) and req.tool_choice.function.name not in names:
        raise bad_request(
            f"tool_choice names {req.tool_choice.function.name!r}, which is not among the tools ({', '.join(names)}).",
            param="tool_choice.function.name",
        )
    if not req.tools and req.tool_choice == "required":
        raise bad_request("tool_choice 'required' needs at least one tool.", param="tool_choice")


def _given_sources(req: SamplingFields) -> list[str]:
    sources = []
    response_format = getattr(req, "response_format", None)
    if response_format is not None and response_format.type != "text":
        sources.append("response_format")
    sources += [
        name
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        if getattr(req, name) is not None
    ]
    tool_choice = getattr(req, "tool_choice", None)
    if tool_choice == "required" or isinstance(tool_choice, NamedToolChoice):
        sources.append("tool_choice")
    return sources


def _constraint_of(req: Any, param: str) -> tuple[str, str, Any]:
    """(kind, source, the same as a structural-tag format) for the one source given."""
    if param == "response_format":
        if req.response_format.type == "json_object":
            return "json_object", "", JSONSchemaFormat(json_schema={"type": "object"})
        schema = req.response_format.json_schema.schema_
        schema = {} if schema is None else schema  # OpenAI allows a schema-less json_schema: any JSON
        return "json_schema", json.dumps(schema), JSONSchemaFormat(json_schema=schema)
    if param == "guided_json":
        schema = req.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise bad_request(f"guided_json is not JSON: {exc.msg}.", param=param) from None
        return "json_schema", json.dumps(schema), JSONSchemaFormat(json_schema=schema)
    if param == "guided_regex":
        return "regex", req.guided_regex, RegexFormat(pattern=req.guided_regex)
    if param == "guided_choice":
        if any(not choice for choice in req.guided_choice):
            raise bad_request("guided_choice entries must not be empty.", param=param)
        grammar = "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in req.guided_choice)
        return "grammar", grammar, GrammarFormat(grammar=grammar)
    if param == "guided_grammar":
        return "grammar", req.guided_grammar, GrammarFormat(grammar=req.guided_grammar)
    raise AssertionError(f"no constraint source {param}")


def _parse(kind: str, source: str, param: str) -> None:
    """Parse without compiling (no tokenizer): microseconds for real schemas, and the error says
    what is wrong."""
    try:
        if kind == "json_schema":
            json_schema_grammar(source)
        elif kind == "regex":
            xgr.Grammar.from_regex(source)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(source)
    except (RuntimeError, ValueError, TypeError) as exc:
        what = {"json_schema": "JSON schema", "regex": "regular expression", "grammar": "grammar"}[kind]
        raise bad_request(
            f"{param} is not a {what} this service can enforce: {_clean(exc)}", param=param, code="invalid_grammar"
        ) from None


def _clean(exc: BaseException) -> str:
    text = _XGRAMMAR_PREFIX.sub("", str(exc).strip()).strip()
    return text[:500] or type(exc).__name__


def _compact_json(source: str) -> str:
    """A structural tag with each JSON schema part replaced by its grammar from
    json_grammar.py: a structural tag's own JSON allows any whitespace, where a model can pad
    forever, and shares xgrammar's hole in length-bounded strings."""
    tag = json.loads(source)

    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(item) for item in node]
        if not isinstance(node, dict):
            return node
        if node.get("type") == "json_schema" and node.get("style", "json") == "json":
            schema = node["json_schema"]
            return {"type": "grammar", "grammar": json_schema_grammar(json.dumps(schema if schema is not True else {}))}
        return {key: visit(value) for key, value in node.items()}

    return json.dumps(visit(tag))
