"""What an artifact folder holds, shared by its writer (``vlmc.backends.artifact``) and
its reader (``vlmc.runtime.artifact``)."""

# 3: families (meta["family"], meta["inputs"]), typed KV caches in the layer tables, the
# verify entry point and program.json (the program a KV re-plan starts from).
FORMAT_VERSION = 3

# Files copied from the checkpoint when present (tokenizer, chat template, configs).
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "chat_template.json", "generation_config.json", "preprocessor_config.json",
                "processor_config.json", "vocab.json", "merges.txt", "added_tokens.json")
# Files vlmc writes besides the weight shards (processor.json / generation.json: the
# family's image preprocessing spec and the generation defaults).
WRITTEN_FILES = ("manifest.json", "model.py", "program.ir", "program.json", "processor.json", "generation.json")
