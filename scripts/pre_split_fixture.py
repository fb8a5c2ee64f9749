"""Reference ids for GGUF byte-level tokenizers whose `tokenizer.ggml.pre` names a split regex.

transformers 5.24 installs `Split(regex, "isolated")` + `ByteLevel(use_regex=False)` in front of the
BPE when a GGUF file's `tokenizer.ggml.pre` is in `GGUF_PRE_TOKENIZER_SPLITS` (llama-bpe, qwen2,
tekken, gpt-4o, ...). SmolLM2's file says `smollm`, which is not in the table; to test the other
splits against the real vocabulary we apply `set_split_regex` to SmolLM2's tokenizer, which is
exactly what transformers does for a file naming that `pre`. SmolLM2's merges rarely cross the
boundaries where these splits differ, so the pre-tokenized pieces are recorded as well as the ids.

Needs: transformers==5.24.0, gguf (and torch, which transformers' GGUF reader imports).
Usage: python scripts/pre_split_fixture.py /path/to/SmolLM2-135M-Instruct.Q4_1.gguf OUT.json
"""

import json
import os
import sys

from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import set_split_regex

TEXTS = [
    "Hello, world! I'm sure they'll say it's DONE, won't they?",
    "def f(x):\n    return x ** 2  # 12345678 squared\n\n\n",
    "  leading\t\ttabs and   runs of spaces  \r\n\r\nwindows",
    "naïve café Ångström «quoted» — ok? ¿Sí!",
    "日本語のテキスト 中文文本 한국어",
    "emoji 😀👍🏽 👨‍👩‍👧 and é (e + \u0301)",
    "CamelCaseWords and UPPERcase and lowerCASE: HTTPServer",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 ٣٤٥",
    "path/to/file.rs:42 https://example.com/a?b=c&d=e",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "x" * 50 + " " + "é" * 20,
    "",
    "I'M DONE'S 'LL x'Ve",
    "a  \n\n  b\n \tc   ",
]
PRES = ["llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"]


def main(gguf, out):
    directory, name = os.path.split(os.path.abspath(gguf))
    cases = []
    for pre in PRES:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        set_split_regex(tok, {"pre_tokenizer_type": pre})
        for text in TEXTS:
            pieces = [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
            cases.append({"pre": pre, "text": text, "pieces": pieces, "ids": tok.encode(text, add_special_tokens=False)})
    with open(out, "w") as f:
        json.dump({"source": "scripts/pre_split_fixture.py, transformers 5.24.0", "cases": cases}, f,
                  ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
