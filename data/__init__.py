"""speedloop's data: shard format, corpus preparation, tokenizer and loaders.

This package is on the fixed side of the benchmark: the agent never edits it, and it
must never depend on the research surface (`model/`, `kernels/`). Modules:

- `shards`: the llm.c / modded-nanogpt token shard format.
- `cache`: where prepared datasets live, how files land there, reading `meta.json`.
- `corpus`: which text files make a corpus and which split each document goes to.
- `tokenizer`: training (rustbpe), saving and loading (tiktoken) the BPE tokenizer.
- `prepare` / `fineweb`: building a dataset; `python -m data prepare ...` is the CLI.
- `loader`: random training windows and whole splits for the evaluator.
"""
