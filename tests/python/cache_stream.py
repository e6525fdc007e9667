"""A streamed answer from the gateway's response cache, read by the official `openai`
package: the first call fills the cache (x-cache: miss), the second is a hit replayed as
a stream, which must parse to the same text and carry its usage."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["STEP3GW_BASE_URL"], api_key=os.environ["STEP3GW_API_KEY"])
model = os.environ["STEP3GW_MODEL"]


def streamed():
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a bee in one sentence"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in raw.parse():
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return raw.headers.get("x-cache"), text, usage, finish


first = streamed()
second = streamed()
assert first[0] == "miss", first
assert second[0] == "hit", second
assert first[1] == second[1] and second[1], (first, second)
assert second[2] is not None and second[2].total_tokens == first[2].total_tokens, (first, second)
assert second[3] == "stop", second
print("cache stream: ok")
