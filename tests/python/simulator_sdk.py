"""The official OpenAI SDK against the simulated model server: every API the simulator
serves must parse into the SDK's types, as vLLM's answers do.

Run by `src/sim/sdk_tests.rs` with STEP3SIM_BASE_URL set to a running simulator's
`.../v1` (default settings plus the BGE-M3 embedding model: 24-token replies with 4 of
reasoning, 1024-float embeddings).
"""

import base64
import json
import os
import struct

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["STEP3SIM_BASE_URL"], api_key="unused", max_retries=0)
CHAT = "stepfun-ai/Step3-VL-10B"
EMBED = "BAAI/bge-m3"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}}]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]

# Chat: n choices, an answer that follows the question, usage over all choices.
reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "What is 2+2?"}], n=3)
assert [c.index for c in reply.choices] == [0, 1, 2], reply
assert reply.choices[0].message.content.startswith("The answer is 4."), reply
assert reply.usage.completion_tokens == 3 * 24, reply.usage
print("chat n: ok")

# Chat: a tool call, then the conversation goes on with the tool's result.
reply = client.chat.completions.create(model=CHAT, messages=QUESTION, tools=TOOLS)
choice = reply.choices[0]
call = choice.message.tool_calls[0]
assert choice.finish_reason == "tool_calls" and choice.message.content is None, reply
assert call.function.name == "get_weather" and list(json.loads(call.function.arguments)) == ["city"], call
follow_up = QUESTION + [
    choice.message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
]
answer = client.chat.completions.create(model=CHAT, messages=follow_up, tools=TOOLS)
assert answer.choices[0].message.content.startswith("The get_weather tool returned sunny, 21 C."), answer
print("chat tools: ok")

# Chat stream: tool-call deltas of two choices, assembled the way clients do it.
stream = client.chat.completions.create(
    model=CHAT, messages=QUESTION, tools=TOOLS, n=2, stream=True, stream_options={"include_usage": True}
)
calls, finished, usage = {}, {}, None
for chunk in stream:
    usage = chunk.usage or usage
    for c in chunk.choices:
        for delta in c.delta.tool_calls or []:
            slot = calls.setdefault(c.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or delta.id
            slot["name"] += delta.function.name or ""
            slot["arguments"] += delta.function.arguments or ""
        if c.finish_reason:
            finished[c.index] = c.finish_reason
assert finished == {0: "tool_calls", 1: "tool_calls"}, finished
assert all(json.loads(c["arguments"]) == json.loads(call.function.arguments) for c in calls.values()), calls
assert calls[0]["id"] != calls[1]["id"] and usage.completion_tokens == 2 * reply.usage.completion_tokens
print("chat stream tools: ok")

# Chat stream through the SDK's helper, and reasoning switched off.
with client.chat.completions.stream(model=CHAT, messages=[{"role": "user", "content": "Describe a bee."}]) as s:
    final = s.get_final_completion()
assert final.choices[0].message.content.startswith("The question was about a bee."), final
reply = client.chat.completions.create(
    model=CHAT,
    messages=[{"role": "user", "content": "Hi"}],
    extra_body={"chat_template_kwargs": {"enable_thinking": False}},
)
assert getattr(reply.choices[0].message, "reasoning_content", None) is None, reply
print("chat stream: ok")

# Legacy completions, plain and streamed with echo and usage.
completion = client.completions.create(model=CHAT, prompt=["What is 3*4?", "Tell me about cats"], n=2, max_tokens=8)
assert [c.index for c in completion.choices] == [0, 1, 2, 3], completion
assert completion.choices[0].text.startswith(" The answer is 12."), completion
assert completion.usage.completion_tokens == 4 * 8, completion.usage
text, usage = "", None
for chunk in client.completions.create(
    model=CHAT, prompt="Say hi", echo=True, stream=True, stream_options={"include_usage": True}
):
    usage = chunk.usage or usage
    text += "".join(c.text for c in chunk.choices)
assert text.startswith("Say hi The question was about hi."), text
assert usage.completion_tokens == 16, usage
print("completions: ok")

# Embeddings: floats, the SDK's default base64, and vLLM's refusals.
floats = client.embeddings.create(model=EMBED, input=["hello world", "hello there", "tax report"], encoding_format="float")
vectors = [d.embedding for d in floats.data]
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
assert len(vectors[0]) == 1024 and abs(dot(vectors[0], vectors[0]) - 1) < 1e-4
assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0, floats.usage
decoded = client.embeddings.create(model=EMBED, input="hello world")  # the SDK asks for base64
assert max(abs(x - y) for x, y in zip(decoded.data[0].embedding, vectors[0])) < 1e-6
raw = client.embeddings.create(model=EMBED, input="hello world", encoding_format="base64").data[0].embedding
assert struct.unpack("<1024f", base64.b64decode(raw))[0] == decoded.data[0].embedding[0]
for bad in [dict(model=EMBED, dimensions=256), dict(model=CHAT)]:
    try:
        client.embeddings.create(input="x", **bad)
        raise SystemExit(f"accepted {bad}")
    except openai.BadRequestError:
        pass
print("embeddings: ok")

# Responses: plain, cut short, streamed, and with a function tool.
response = client.responses.create(model=CHAT, input="What is 6/3?", instructions="Be brief.")
assert response.output_text.startswith("The answer is 2."), response
assert response.output[0].type == "reasoning" and response.usage.output_tokens_details.reasoning_tokens == 4
short = client.responses.create(
    model=CHAT,
    input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is in this picture?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
    ]}],
    max_output_tokens=12,
)
assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens", short
assert short.output_text.startswith("The image you shared"), short.output_text
kinds, deltas = [], ""
with client.responses.stream(model=CHAT, input="Tell me about bees") as s:
    for event in s:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
    final = s.get_final_response()
assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
assert final.output_text == deltas and final.usage.total_tokens > 0, final
tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
called = client.responses.create(model=CHAT, input="Weather in Paris?", tools=tools)
function_call = next(item for item in called.output if item.type == "function_call")
assert function_call.name == "get_weather" and json.loads(function_call.arguments)["city"], function_call
answered = client.responses.create(model=CHAT, tools=tools, input=[
    *QUESTION,
    function_call.model_dump(exclude_none=True),
    {"type": "function_call_output", "call_id": function_call.call_id, "output": "rainy"},
])
assert answered.output_text.startswith("The get_weather tool returned rainy."), answered
with client.responses.stream(model=CHAT, input="Weather in Paris?", tools=tools) as s:
    streamed = next(item for item in s.get_final_response().output if item.type == "function_call")
assert streamed.arguments == function_call.arguments, streamed
print("responses: ok")
