"""LoRA and QLoRA fine-tuning of one task (role) at a time, and the adapters it makes.

    data.py      gold-set cases -> tokenized examples, prompt rendered as at inference,
                 loss on the answer only
    train.py     PEFT LoRA (QLoRA on CUDA) with TRL's SFTTrainer; the loss history
    export.py    a vLLM LoRA folder, or a merged checkpoint (for Ollama)

The adapter registry (one record an adapter: task, base fingerprint, data hash, LoRA
settings, loss, eval metrics) is `coheara.adapters`, below this package: the backend and
the task layer read it without importing fine-tuning. This package needs the `finetune`
extra (peft, trl, datasets, accelerate).
"""
