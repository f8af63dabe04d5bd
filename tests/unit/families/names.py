"""The families every per-family test runs on: adding a family to tunelens is one file in
``tunelens/families/`` and one name here (``test_the_list_is_every_declared_family`` keeps them equal)."""

NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "phi3", "olmo2"]
