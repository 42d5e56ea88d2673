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

    # n choices, distinct and reproducible with a seed; the same streamed.
    several = dict(model=model, prompt="My favourite animal is", n=3, temperature=1.0, seed=7, max_tokens=8)
    first = client.completions.create(**several)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2], first.choices
    assert len(set(texts)) == 3, f"n=3 gave {texts}"
    assert [c.text for c in client.completions.create(**several).choices] == texts, "seeded n"
    streamed_texts = ["", "", ""]
    for chunk in client.completions.create(**several, stream=True):
        for c in chunk.choices:
            streamed_texts[c.index] += c.text
    assert streamed_texts == texts, f"streamed n: {streamed_texts} != {texts}"
    chats = client.chat.completions.create(
        model=model, messages=messages, n=2, temperature=1.0, seed=3, max_tokens=8
    )
    assert [c.index for c in chats.choices] == [0, 1], chats.choices

    # A prompt list: a choice per prompt, in order, each as it would be alone.
    prompts = ["The capital of France is", "1, 2, 3,"]
    listed = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    alone = [
        client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in prompts
    ]
    assert [c.text for c in listed.choices] == alone, f"{listed.choices} != {alone}"

    # vLLM's extensions through extra_body change the answer.
    bounded = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Answer with one word: is the sky blue?"}],
        max_tokens=40,
        temperature=0,
    )
    forced = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Answer with one word: is the sky blue?"}],
        max_tokens=40,
        temperature=0,
        extra_body={"min_tokens": bounded.usage.completion_tokens + 5, "repetition_penalty": 1.1},
    )
    assert forced.usage.completion_tokens >= bounded.usage.completion_tokens + 5, forced.usage
    # A field no API defines is ignored, as vLLM does.
    ignored = client.completions.create(
        model=model, prompt="Hi", max_tokens=2, extra_body={"no_such_field": 1}
    )
    assert ignored.choices, ignored

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

    print(
        f"openai {openai.__version__}: chat (plain, streamed), completion, n, prompt lists, "
        "extra_body and errors ok"
    )


if __name__ == "__main__":
    main()
