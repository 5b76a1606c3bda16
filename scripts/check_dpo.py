"""TRL's DPOTrainer on the same model, pairs and settings as a Kiln DPO run (tests/preference.rs).

Trains `--steps` steps of `--batch` pairs (all of them each step: constant lr, no dropout, fp32),
full fine-tune or LoRA (its adapter starting from `--lora-init`, Kiln's initial adapter, so both
start from the same weights), and writes per step the loss, grad norm and TRL's metrics, and
the final weights, as JSON:

    python scripts/check_dpo.py --model DIR --data pairs.jsonl --out out.json --save DIR \
        --steps 5 --batch 16 --lr 1e-3 --beta 0.1 --loss sigmoid [--lora-init A.safetensors
        --lora-r 4 --lora-alpha 8 --targets q_proj,v_proj]
"""

import argparse
import json

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class Record(TrainerCallback):
    """Every step's logs, as the trainer logs them."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.logs.append(dict(logs, step=state.global_step))


class ExactLoss(DPOTrainer):
    """The loss of each training step unrounded (the trainer averages it over the log interval)."""

    step_losses = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self.step_losses.append((loss[0] if return_outputs else loss).item())
        return loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--precompute", action="store_true")
    p.add_argument("--lora-init")
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    a = p.parse_args()

    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(a.data) if line.strip()][: a.batch]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)

    peft_config = None
    if a.lora_init:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=a.lora_r,
            lora_alpha=a.lora_alpha,
            lora_dropout=0.0,
            target_modules=a.targets.split(","),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        # Kiln's initial adapter (A drawn by Kiln, B zero), so both runs start the same.
        initial = load_file(a.lora_init)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    key = name.replace(".default", "")
                    param.copy_(initial[key])
        peft_config = None  # already applied

    args = DPOConfig(
        output_dir=a.save + "-trainer",
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=a.max_grad_norm,
        beta=a.beta,
        loss_type=[a.loss],
        label_smoothing=a.label_smoothing,
        max_length=a.max_length,
        precompute_ref_log_probs=a.precompute,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        dataloader_drop_last=False,
        remove_unused_columns=False,
    )
    record = Record()
    trainer = ExactLoss(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[record],
    )
    trainer.train()

    keys = ["grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected"]
    steps = []
    for loss, logs in zip(ExactLoss.step_losses, record.logs):
        entry = {"loss": loss}
        entry.update({k: logs[k] for k in keys if k in logs})
        steps.append(entry)
    trainer.model.save_pretrained(a.save, safe_serialization=True)
    tokenized = [
        {k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for i in range(len(trainer.train_dataset))
    ]
    json.dump({"steps": steps, "tokenized": tokenized}, open(a.out, "w"))


if __name__ == "__main__":
    main()
