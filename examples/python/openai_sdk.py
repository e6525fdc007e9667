"""The README's OpenAI SDK examples, run against a live gateway by the test suite.

Set STEP3GW_BASE_URL (e.g. http://localhost:8080/v1) and STEP3GW_API_KEY, then:
    python examples/python/openai_sdk.py
"""

import os
import pathlib

import openai
from openai import OpenAI

os.chdir(pathlib.Path(__file__).parent)
client = OpenAI(base_url=os.environ["STEP3GW_BASE_URL"], api_key=os.environ["STEP3GW_API_KEY"])

# --- example: plain
reply = client.chat.completions.create(
    model="stepfun-ai/Step3-VL-10B",
    messages=[{"role": "user", "content": "What does a bee do all day?"}],
    max_tokens=256,
)
print(reply.choices[0].message.content)
print(reply.usage.total_tokens, "tokens")
# --- end
assert reply.choices[0].message.content
assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
print("plain: ok")

# --- example: stream
stream = client.chat.completions.create(
    model="stepfun-ai/Step3-VL-10B",
    messages=[{"role": "user", "content": "Tell me a very short story."}],
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
print(text)
print(usage.total_tokens, "tokens")
# --- end
assert text and usage is not None and usage.completion_tokens > 0
print("stream: ok")

# --- example: image
import base64
import pathlib

image = base64.b64encode(pathlib.Path("bee.png").read_bytes()).decode()
reply = client.chat.completions.create(
    model="stepfun-ai/Step3-VL-10B",
    messages=[{
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": "What is in this picture?"},
        ],
    }],
)
print(reply.choices[0].message.content)
# --- end
assert reply.choices[0].message.content
print("image: ok")

# --- example: responses
response = client.responses.create(
    model="stepfun-ai/Step3-VL-10B",
    input="What is 2+2?",
    max_output_tokens=64,
)
print(response.output_text)
print(response.usage.input_tokens, response.usage.output_tokens)
# --- end
assert response.output_text and response.usage.output_tokens > 0
print("responses: ok")

# --- example: embeddings
vectors = client.embeddings.create(model="BAAI/bge-m3", input=["a bee", "a flower"])
print(len(vectors.data), "vectors of", len(vectors.data[0].embedding))
# --- end
assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0
assert vectors.usage.prompt_tokens > 0
print("embeddings: ok")

# models.retrieve, and a used-up quota is not retried by the SDK (x-should-retry: false).
assert client.models.retrieve("stepfun-ai/Step3-VL-10B").id == "stepfun-ai/Step3-VL-10B"

# The SDK's own error classes must come out of the gateway's error bodies.
bad = OpenAI(base_url=os.environ["STEP3GW_BASE_URL"], api_key="sk-step3-not-a-real-key", max_retries=0)
try:
    bad.chat.completions.create(model="stepfun-ai/Step3-VL-10B", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("a bad key was accepted")
except openai.AuthenticationError as e:
    assert e.code == "invalid_api_key", e
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
print("errors: ok")
