#!/usr/bin/env python3
"""Token ids and assistant masks of conversations as transformers computes them, for comparing
with `kiln data preview --json`.

    python3 scripts/check_chat_masks.py TOKENIZER_DIR TEMPLATE_FILE CONVERSATIONS.jsonl \
        [--special TOKEN ...] [--last-assistant]

Prints one JSON line per conversation: {"input_ids": [...], "labels": [...]}, the labels being
the ids where `apply_chat_template(..., return_assistant_tokens_mask=True)` marks the
assistant's tokens and -100 elsewhere (with --last-assistant, only the last assistant turn's).
"""

import json
import sys

from transformers import AutoTokenizer


def main():
    args = sys.argv[1:]
    special, last_only = [], False
    positional = []
    while args:
        a = args.pop(0)
        if a == "--special":
            special.append(args.pop(0))
        elif a == "--last-assistant":
            last_only = True
        else:
            positional.append(a)
    tokenizer_dir, template_file, data = positional
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special})
    tokenizer.chat_template = open(template_file).read()
    for line in open(data):
        row = json.loads(line)
        messages = row["messages"]
        out = render(tokenizer, messages)
        ids, mask = out["input_ids"], list(out["assistant_masks"])
        if last_only:
            # The last generation block alone: the last run of marked tokens (user turns
            # always separate the runs).
            end = max(i for i, m in enumerate(mask) if m) + 1
            start = end
            while start > 0 and mask[start - 1]:
                start -= 1
            mask = [1 if start <= i < end else 0 for i in range(len(mask))]
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        print(json.dumps({"input_ids": list(ids), "labels": labels}))


def render(tokenizer, messages):
    return tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )


if __name__ == "__main__":
    main()
