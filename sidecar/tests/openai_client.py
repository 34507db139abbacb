"""Drives a running sidecar with the official OpenAI Python client (tests/openai_client.rs starts
the sidecar and checks this script's exit status)."""
import os
import sys

from openai import NotFoundError, OpenAI

client = OpenAI(base_url=os.environ["SIDECAR_URL"] + "/v1", api_key="unused")
model = os.environ["SIDECAR_MODEL"]

assert [m.id for m in client.models.list()] == [model]

r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name a color."}],
    n=8, max_tokens=8, temperature=0.8, seed=1,
)
assert len(r.choices) == 8, r
assert sorted(c.index for c in r.choices) == list(range(8))
assert all(c.message.role == "assistant" for c in r.choices)
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

chunks = list(client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=10, stream=True, temperature=0,
))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text, "streamed no text"
assert any(c.choices and c.choices[0].finish_reason for c in chunks), "no finish_reason"

t = client.completions.create(model=model, prompt="The sky is", max_tokens=4, temperature=0)
assert t.choices[0].text and t.usage.completion_tokens == 4, t

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    sys.exit("an unknown model was accepted")
except NotFoundError:
    pass
print("openai client: ok")
