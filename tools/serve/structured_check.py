"""Structured outputs through the official `openai` client against a live `weave serve`.

1. 100 requests over 22 JSON schemas (nested objects, arrays, enums, `required`, bounded
   numbers, patterned strings) at temperature 1, on both endpoints, streamed and not, 32 at a
   time: every output parses and validates against its schema (the `jsonschema` package).
2. Regex outputs full-match, choices are in their set, named and required tool calls give
   `tool_calls` whose arguments validate against the tool's parameters.
3. 32 constrained requests running with 32 unconstrained greedy ones: the unconstrained
   outputs equal what they are without the constrained neighbours.

    python tools/serve/structured_check.py http://127.0.0.1:8000/v1
Exits non-zero on the first thing that is wrong.
"""
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
model = client.models.list().data[0].id
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": S, "population": {"type": "integer", "minimum": 1}}, "required": ["city"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}}, "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}, "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100}, "y": {"type": "integer", "minimum": -100, "maximum": 100}}, "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["id", "email"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"enum": ["yes", "no"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"], "additionalProperties": False}, "minItems": 1, "maxItems": 2}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}, "label": S}, "required": ["level", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}}, "required": ["a", "b", "c"], "additionalProperties": False},
    {"type": "object", "properties": {"temp": {"type": "number", "exclusiveMinimum": -50, "exclusiveMaximum": 60}, "unit": {"enum": ["C", "F"]}}, "required": ["temp", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]}}, "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "event"}, "at": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}}, "required": ["kind", "at"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}}, "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"title": S, "meta": {"type": "object", "properties": {"draft": {"type": "boolean"}, "rev": {"type": "integer", "minimum": 0, "maximum": 50}}, "required": ["draft"], "additionalProperties": False}}, "required": ["title", "meta"], "additionalProperties": False},
    {"type": "object", "properties": {"name": S, "nick": {"type": ["string", "null"], "maxLength": 8}}, "required": ["name", "nick"], "additionalProperties": False},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999}, "maxItems": 3}}, "required": ["ids"], "additionalProperties": False},
]
check(len(SCHEMAS) >= 20, "at least 20 schemas")
for s in SCHEMAS:
    jsonschema.Draft202012Validator.check_schema(s)

PROMPTS = ["Describe a record as JSON.", "Give me JSON data.", "Answer in JSON.", "Fill in this form as JSON."]


def run_schema(k):
    """Request k of 100: schema k % 22, alternating endpoints, streamed every third one."""
    schema = SCHEMAS[k % len(SCHEMAS)]
    chat = k % 2 == 0
    stream = k % 3 == 0
    # vLLM's field half the time, OpenAI's the other half.
    if k % 4 < 2:
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": f"s{k % len(SCHEMAS)}", "schema": schema, "strict": True}}}
    else:
        extra = {"extra_body": {"structured_outputs": {"json": schema, "disable_any_whitespace": True}}}
    common = dict(model=model, max_tokens=400, temperature=1.0, seed=k, stream=stream)
    if chat:
        msgs = [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}]
        if "response_format" in extra:
            r = client.chat.completions.create(messages=msgs, response_format=extra["response_format"], **common)
        else:
            r = client.chat.completions.create(messages=msgs, extra_body=extra["extra_body"], **common)
        if stream:
            parts, finish = [], None
            for ch in r:
                if ch.choices:
                    parts.append(ch.choices[0].delta.content or "")
                    finish = ch.choices[0].finish_reason or finish
            return k, "".join(parts), finish
        return k, r.choices[0].message.content, r.choices[0].finish_reason
    prompt = PROMPTS[k % len(PROMPTS)] + "\n"
    body = dict(extra.get("extra_body", {}))
    if "response_format" in extra:
        body["response_format"] = extra["response_format"]
    r = client.completions.create(prompt=prompt, extra_body=body, **common)
    if stream:
        parts, finish = [], None
        for ch in r:
            if ch.choices:
                parts.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
        return k, "".join(parts), finish
    return k, r.choices[0].text, r.choices[0].finish_reason


t0 = time.time()
with ThreadPoolExecutor(32) as pool:
    results = list(pool.map(run_schema, range(100)))
for k, text, finish in results:
    schema = SCHEMAS[k % len(SCHEMAS)]
    check(finish == "stop", f"request {k} (schema {k % len(SCHEMAS)}) finished by {finish}: {text!r}")
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        check(False, f"request {k}: not JSON ({e}): {text!r}")
    try:
        jsonschema.validate(v, schema)
    except jsonschema.ValidationError as e:
        check(False, f"request {k}: does not validate against schema {k % len(SCHEMAS)}: {e.message}: {text!r}")
    check(True, "validates")
print(f"structured: 100 JSON-schema requests over {len(SCHEMAS)} schemas valid in {time.time() - t0:.1f} s")

# Regex and choice, both endpoints.
REGEXES = [r"\d{3}-\d{4}", r"[A-Z][a-z]{2,6} [A-Z][a-z]{2,6}", r"(yes|no), because [a-z ]{5,20}\.", r"0x[0-9a-f]{8}"]
for i, rx in enumerate(REGEXES):
    r = client.completions.create(model=model, prompt="Value:", max_tokens=40, temperature=1.0, seed=i, extra_body={"structured_outputs": {"regex": rx}})
    check(re.fullmatch(rx, r.choices[0].text) is not None, f"regex {rx}: {r.choices[0].text!r}")
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say something."}], max_tokens=40, temperature=1.0, seed=i, extra_body={"guided_regex": rx})
    check(re.fullmatch(rx, r.choices[0].message.content) is not None, f"chat regex {rx}: {r.choices[0].message.content!r}")
OPTIONS = ["positive", "negative", "neutral, leaning positive"]
for i in range(4):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Classify: I love it."}], max_tokens=20, temperature=1.0, seed=i, extra_body={"structured_outputs": {"choice": OPTIONS}})
    check(r.choices[0].message.content in OPTIONS, f"choice {r.choices[0].message.content!r}")
    check(r.choices[0].finish_reason == "stop", "a finished choice stops")

# Tool calls: a named function and "required", streamed and not.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "book_table", "description": "Book a restaurant table", "parameters": {"type": "object", "properties": {"people": {"type": "integer", "minimum": 1, "maximum": 12}, "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}}, "required": ["people", "time"], "additionalProperties": False}}},
]
params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
msgs = [{"role": "user", "content": "Book a table for four at 19:30, and tell me the weather in Rome."}]
for choice in [{"type": "function", "function": {"name": "book_table"}}, "required"]:
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=1.0, seed=seed)
        c = r.choices[0]
        check(c.finish_reason == "tool_calls", f"tool_choice {choice}: finish_reason {c.finish_reason}")
        check(c.message.tool_calls, f"tool_choice {choice}: no tool_calls in {c.message}")
        for call in c.message.tool_calls:
            if isinstance(choice, dict):
                check(call.function.name == "book_table", f"named call went to {call.function.name}")
            jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
        # Streamed: the client accumulates the deltas into the same shape.
        calls, finish = {}, None
        for ch in client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=1.0, seed=seed, stream=True):
            if not ch.choices:
                continue
            d = ch.choices[0].delta
            for tc in d.tool_calls or []:
                e = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                e["name"] += tc.function.name or ""
                e["arguments"] += tc.function.arguments or ""
            finish = ch.choices[0].finish_reason or finish
        check(finish == "tool_calls" and calls, f"streamed tool_choice {choice}: {finish} {calls}")
        for e in calls.values():
            jsonschema.validate(json.loads(e["arguments"]), params[e["name"]])
# A tool result fed back is accepted and answered.
r = client.chat.completions.create(model=model, max_tokens=20, temperature=0, tools=TOOLS, messages=msgs + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\", \"unit\": \"celsius\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
])
check(r.choices[0].message.content is not None, "an answer after a tool result")
print("structured: regex, choice and tool calls valid")

# 32 constrained beside 32 unconstrained greedy: the unconstrained ones do not change.
FREE = [f"Tell me about the number {i}." for i in range(32)]


def free(i):
    r = client.completions.create(model=model, prompt=FREE[i], max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text


with ThreadPoolExecutor(32) as pool:
    alone = list(pool.map(free, range(32)))
with ThreadPoolExecutor(64) as pool:
    futs_free = [pool.submit(free, i) for i in range(32)]
    futs_guided = [pool.submit(run_schema, k) for k in range(32)]
    together = [f.result() for f in futs_free]
    guided = [f.result() for f in futs_guided]
for i in range(32):
    check(together[i] == alone[i], f"unconstrained request {i} changed beside constrained ones: {together[i]!r} != {alone[i]!r}")
for k, text, finish in guided:
    check(finish == "stop", f"mixed: request {k} finished by {finish}")
    jsonschema.validate(json.loads(text), SCHEMAS[k % len(SCHEMAS)])
print(f"structured: 32 constrained beside 32 unconstrained: unconstrained unchanged, constrained valid ({checks} checks)")
