"""Talk to `persona serve` with the official OpenAI client (used by examples/demo.sh).

    python examples/http_client.py URL TOKEN "question"
"""

import sys

from openai import NotFoundError, OpenAI

url, token, question = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
print("models this token sees:", ", ".join(m.id for m in client.models.list()))
reply = client.chat.completions.create(
    model="user:alice", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
)
print("user:alice over HTTP:", reply.choices[0].message.content)
print("user:alice streamed :", end=" ", flush=True)
for chunk in client.chat.completions.create(
    model="user:alice", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0, stream=True
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
try:
    client.chat.completions.create(model="user:bob", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
except NotFoundError:
    print("user:bob with alice's token: 404 (as if it did not exist)")
