"""The official OpenAI Python client against a running agent.

Usage: openai_client.py BASE_URL MODEL

Exits non-zero, naming the check, if anything the client sees is not what OpenAI's API promises.
"""

import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    listed = [m.id for m in client.models.list().data]
    assert listed == [model], f"models.list: {listed}"

    messages = [{"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    choice = plain.choices[0]
    assert choice.message.role == "assistant", choice
    assert choice.message.content, "chat: empty content"
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert plain.usage.completion_tokens <= 12, plain.usage
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    streamed = "".join(pieces)
    assert streamed == choice.message.content, f"stream {streamed!r} != {choice.message.content!r}"
    assert finish == choice.finish_reason, finish
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens, usage
    # The repeated prompt's whole KV blocks came from the prefix cache.
    assert plain.usage.prompt_tokens_details.cached_tokens == 0, plain.usage
    cached = usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < usage.prompt_tokens, usage

    completion = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text, "completion: empty text"
    assert completion.usage.completion_tokens == 8 or completion.choices[0].finish_reason == "stop"

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    except openai.NotFoundError as e:
        assert e.body["param"] == "model", e.body
    else:
        raise AssertionError("an unknown model was accepted")

    try:
        client.chat.completions.create(model=model, messages=messages, temperature=7)
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body
    else:
        raise AssertionError("temperature 7 was accepted")

    print(f"openai {openai.__version__}: chat (plain, streamed), completion and errors ok")


if __name__ == "__main__":
    main()
