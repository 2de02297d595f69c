"""The official `openai` Python client against a live `weave serve`: completions and chat,
streamed and not. Exits non-zero on the first thing that is wrong.

    python tools/serve/openai_client_check.py http://127.0.0.1:8000/v1
"""
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


models = client.models.list()
model = models.data[0].id
check(bool(model), "models.list names a model")

# Completions, not streamed.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
check(c.object == "text_completion", f"completion object {c.object}")
check(len(c.choices) == 1 and c.choices[0].text, f"completion text {c.choices}")
check(c.choices[0].finish_reason in ("stop", "length"), f"finish_reason {c.choices[0].finish_reason}")
check(c.usage.completion_tokens <= 8 and c.usage.prompt_tokens > 0, f"usage {c.usage}")
full = c.choices[0].text

# Completions, streamed: the same greedy text, usage at the end.
parts, usage = [], None
for chunk in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        parts.append(chunk.choices[0].text)
    if chunk.usage:
        usage = chunk.usage
check("".join(parts) == full, f"streamed text {''.join(parts)!r} != {full!r}")
check(usage is not None and usage.completion_tokens == c.usage.completion_tokens, f"stream usage {usage}")

# n > 1 and logprobs.
c = client.completions.create(model=model, prompt="Once", max_tokens=4, n=2, seed=3, logprobs=2)
check(len(c.choices) == 2, "n=2 gives two choices")
check(all(len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs) for ch in c.choices), "logprobs lists align")

# Chat, not streamed.
msgs = [{"role": "user", "content": "What is 2 + 2?"}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
check(r.object == "chat.completion", f"chat object {r.object}")
check(r.choices[0].message.role == "assistant" and r.choices[0].message.content, f"chat message {r.choices[0]}")
answer = r.choices[0].message.content

# Chat, streamed.
parts, roles = [], []
for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0, stream=True):
    for ch in chunk.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            parts.append(ch.delta.content)
check(roles == ["assistant"], f"stream roles {roles}")
check("".join(parts) == answer, f"streamed chat {''.join(parts)!r} != {answer!r}")

# Errors come back as the client's typed exceptions.
try:
    client.completions.create(model=model, prompt="x", max_tokens=4, temperature=-1)
    check(False, "temperature -1 is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "temperature" in str(e), f"400 names the field: {e}")
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    check(False, "an unknown model is refused")
except openai.NotFoundError as e:
    check(e.status_code == 404, f"404: {e}")

print(f"openai client: {checks} passed, 0 failed")
