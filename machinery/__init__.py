"""The machinery: everything a reader does not need to follow the paper, each file reached from the scripts by
one named call and opening with what it is (for an optimisation: the plain code it equals and the test that
proves it). The reader's path is the top level: model.py -> dpo.py -> data.py -> sft.py, eval.py, and imdb.py
(the paper's IMDb experiment in stages) above them.

    util.py         InputError (one-line errors), the progress line, the command-line builder, device choice
    hub.py          Hugging Face hub downloads by hand (resumable, atomic)
    safetensors.py  the .safetensors format by hand
    hf.py           Hugging Face checkpoints: config.json dialects, key tables, from_pretrained/save_pretrained
    tokenizers.py   a model's tokenizer.json converted to tiktoken; RoBERTa's ids
    roberta.py      the RoBERTa sentiment classifier (the paper's IMDb reward), an encoder built from model.py's blocks
    lora.py         LoRA adapters and the head-only mode: what trains when not everything does
    fast.py         the fast log-prob paths (chunked head, shared prompts, micro-batches by length, compile)
    runtime.py      run plumbing: processes (DDP/FSDP), the run folder, resume, checkpoints, numeric guards, metrics
    memory.py       memory planning (--estimate-memory)
    integrity.py    atomic writes, checkpoint digests (digest.json) checked at every load, corruption named as such
    stages.py       stage records (each stage keyed on its settings and inputs: reuse, resume, recompute, and why)
                    and resumable trainer checkpoints (weights, optimiser, generators, position)
    corpora.py      the dialogue and summarization data: HH single-turn prompts, 2-shot, splits by prompt; TL;DR
                    posts and comparisons; CNN/DailyMail articles
    plan.py         the plan an IMDb run prints before its first stage: each stage's size and an estimated time
"""
