"""Asks an mlx-dist server a chat question through the official OpenAI client
and streams the answer.

    python examples/chat_client.py http://127.0.0.1:8100 "What is the capital of France?"
"""

import sys

import openai


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8100"
    question = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    model = client.models.list().data[0].id
    print(f"> {question}")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} tokens]")


if __name__ == "__main__":
    main()
