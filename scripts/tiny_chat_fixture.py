"""Writes tests/fixtures/llm/tiny-chat/: tiny-llama-tied's weights with a small chat tokenizer.

The tiny models have a 256-token vocabulary and no tokenizer. `lora train` needs one with a chat
template, so this builds a byte-level BPE whose vocabulary is `<unk>` (0), `<|im_start|>` (1, bos),
`<|im_end|>` (2, eos) and the printable ASCII characters plus newline in byte-level form, with a few
merges, and SmolLM2's ChatML template. transformers' `AutoTokenizer` loads the result (checked
below), so it is a real Hugging Face tokenizer directory, not a format of our own.

Run: python scripts/tiny_chat_fixture.py  (needs `tokenizers` and `transformers`).
"""

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests/fixtures/llm/tiny-llama-tied"
OUT = ROOT / "tests/fixtures/llm/tiny-chat"

TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", "model.safetensors", "generation_config.json"]:
        shutil.copy(SRC / name, OUT / name)
    # GPT-2's byte-to-unicode table for the bytes we keep.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {b: chr(c) for b, c in zip(bs, cs)}
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for b in [10] + list(range(32, 127)):
        vocab[table[b]] = len(vocab)
    merges = []
    for pair in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "u")]:
        merged = pair[0] + pair[1]
        if merged not in vocab:
            vocab[merged] = len(vocab)
        merges.append(pair)
    assert len(vocab) <= 256, len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<unk>",
                "add_bos_token": False,
                "chat_template": TEMPLATE,
            },
            indent=2,
        )
    )
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(OUT)
    text = t.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True)
    ids = t(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < 256 and ids[0] == 1, ids
    print("wrote", OUT, len(vocab), "tokens;", text.replace("\n", "\\n"), ids)


if __name__ == "__main__":
    main()
