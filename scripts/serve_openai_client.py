#!/usr/bin/env python3
"""Drives `lora serve` with the official `openai` Python client (the issue's "checked with real
clients"): starts the server on a free loopback port with two adapters trained here, then
- lists the models (the base and both adapters),
- runs a plain and a streamed completion and chat completion for each model, checking that the
  streamed chunks concatenate to the plain text and that usage is reported,
- runs the three models' greedy completions concurrently (threads) and checks each equals the
  same request made alone,
- checks an unknown model is a 404 `NotFoundError` with OpenAI's error body.

    python3 -m venv /tmp/oai && /tmp/oai/bin/pip install openai
    cargo build --release --bin lora
    /tmp/oai/bin/python scripts/serve_openai_client.py [--model DIR_OR_GGUF] [--lora target/release/lora]

Defaults to the tiny chat fixture (tests/fixtures/llm/tiny-chat), so it runs in seconds; pass the
SmolLM2 GGUF for the real model. Exits non-zero on any mismatch.

Observed 2026-11-29 (openai 3.57.0): PASS on tiny-chat (1.2 s) and on SmolLM2-135M-Instruct
(10 s, adapters trained 4 steps each): streamed text equal to plain for the base and both adapters,
completions and chat; the three concurrent greedy completions equal the lone ones; unknown model 404.
"""

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_adapter(lora, model, out, targets, seed):
    data = os.path.join(out + ".jsonl")
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"Item {i}:", "completion": f" value {i * 7 % 10}"}) + "\n")
    subprocess.run([lora, "train", "--model", model, "--data", data, "--out", out, "--steps", "4",
                    "--batch-size", "4", "--lr", "1e-2", "--targets", targets, "--seed", str(seed),
                    "--quiet"], check=True, capture_output=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(ROOT, "tests/fixtures/llm/tiny-chat"))
    p.add_argument("--lora", default=os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release/lora"))
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    train_adapter(args.lora, args.model, a, "all-linear", 1)
    train_adapter(args.lora, args.model, b, "q_proj,v_proj", 2)
    server = subprocess.Popen([args.lora, "serve", "--model", args.model, "--adapter", f"a={a}",
                               "--adapter", f"b={b}", "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        addr = None
        deadline = time.time() + 120
        while time.time() < deadline and addr is None:
            line = server.stderr.readline()
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                addr = m.group(1)
        if addr is None:
            sys.exit("the server did not start")
        client = openai.OpenAI(base_url=addr + "/v1", api_key="unused")
        names = [m.id for m in client.models.list().data]
        base = names[0]
        assert set(names) == {base, "a", "b"}, names
        print("models:", names)

        def complete(model, prompt="Item 3:"):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            return r.choices[0].text, r.usage

        for model in names:
            text, usage = complete(model)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt="Item 3:", max_tokens=8, temperature=0, stream=True) if c.choices)
            assert streamed == text, (model, streamed, text)
            assert usage.completion_tokens > 0 and usage.prompt_tokens > 0, usage
            msgs = [{"role": "user", "content": "Say hi"}]
            chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
            chat_text = chat.choices[0].message.content
            chunks = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True)
            chat_streamed = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
            assert chat_streamed == chat_text, (model, chat_streamed, chat_text)
            print(f"{model}: completion {text!r}, chat {chat_text!r}: stream equal")

        alone = {m: complete(m, f"Item {i}:")[0] for i, m in enumerate(names)}
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            together = dict(zip(names, pool.map(lambda im: complete(im[1], f"Item {im[0]}:")[0], enumerate(names))))
        assert together == alone, (together, alone)
        print("concurrent greedy completions equal the lone ones:", together)

        try:
            complete("no-such-adapter")
            sys.exit("an unknown model was accepted")
        except openai.NotFoundError as e:
            print("unknown model: 404,", e.body.get("message") if isinstance(e.body, dict) else e.body)
        print("PASS")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
