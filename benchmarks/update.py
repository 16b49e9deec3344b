"""Update benchmark: persona's incremental update vs the plain Trainer+PEFT approach.

One run on the embedded base (SmolLM2-135M-Instruct), three sequential updates of one user
(examples/interactions/alice.jsonl, alice-2.jsonl, alice-3.jsonl: different facts each time):

- **persona**: `Trainer.update` with its defaults (replayed rows on top of each batch, the gate,
  length-grouped batches, the base loaded once, loss on assistant tokens only).
- **persona, no replay**: the same with `replay_fraction=0` (forgetting only: what replay buys).
- **plain LoRA**: what people do today: for each update, load the model, attach PEFT LoRA (the
  previous update's adapter, trainable), tokenize padding every example to a fixed max length,
  run `transformers.Trainer`, save. No replay, no regularization.
- **plain full FT**: the same, fine-tuning every weight of the model (forgetting only).

Reported: wall time of the three updates (persona vs plain LoRA), held-out loss on each update's
new data, forgetting (rise of the loss on update 1's held-out data from right after update 1 to
after update 3), and base drift (max |logit difference| of the base with no adapter, before vs
after, plus the fingerprint).

    python benchmarks/update.py            # ~8 min on 2 CPU cores
    python benchmarks/update.py --quick    # smoke run on a tiny random model (seconds)
    python benchmarks/update.py --device cuda --random-base arch   # on a GPU (benchmarks/gpu.sh runs this)

``--device``/``--dtype`` place persona's base as ``persona update`` does (auto: a GPU in bfloat16
where torch sees one; the LoRA factors train in float32 whatever the base's dtype); the plain
baseline runs on the same device (with ``bf16=True`` mixed precision where persona's base is
bfloat16 on a GPU). ``--random-base ARCH`` (from ``serve_engine.py --save-arch``) trains on random
weights of the base's architecture, for a machine without the embedded base: times hold, losses
and forgetting are meaningless there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_placement_options, device_line, header, make_random_base, placement, table, workspace  # noqa: E402

import torch  # noqa: E402

from persona import LoraSettings, Store, load_base  # noqa: E402
from persona.base import fingerprint  # noqa: E402
from persona.interactions import read_interactions  # noqa: E402
from persona.training.batches import iter_batches  # noqa: E402
from persona.lora_runtime import AdapterWeights  # noqa: E402
from persona.training.evaluate import loss_sum  # noqa: E402
from persona.training.trainer import Trainer, UpdateConfig, split_holdout  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
FILES = ["alice.jsonl", "alice-2.jsonl", "alice-3.jsonl"]


def persona_updates(trainer, ref, data, config):
    """Three sequential updates of ``ref``; the versions published and where the gate put each."""
    versions, gates = [], []
    for d in data:
        result = trainer.update(ref, d, config)
        versions.append(result.version.version)
        gates.append("current" if result.promoted else "candidate")
    return versions, gates


def plain_texts(tokenizer, interactions):
    texts = []
    for i in interactions:
        if i.messages:
            msgs = [{"role": r, "content": c} for r, c in i.messages]
        elif i.prompt is not None:
            msgs = [{"role": "user", "content": i.prompt}, {"role": "assistant", "content": i.completion}]
        else:
            texts.append(i.text)
            continue
        texts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return texts


def plain_dataset(tokenizer, interactions, max_length):
    enc = tokenizer(plain_texts(tokenizer, interactions), padding="max_length", truncation=True, max_length=max_length)
    rows = []
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return rows


def plain_update(base_dir, previous, out_dir, train_items, cfg, *, full=False, model=None):
    """One update the plain way. Returns the trained model (full FT) or the adapter dir (LoRA)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer as HFTrainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if full:
        model = model if model is not None else AutoModelForCausalLM.from_pretrained(base_dir)
        model.requires_grad_(True)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir)  # reloaded for every update
        if previous is None:
            model = get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.05,
                                                     target_modules=cfg["targets"], task_type="CAUSAL_LM"))
        else:
            model = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
    args = TrainingArguments(
        output_dir=str(out_dir) + "-trainer", num_train_epochs=cfg["epochs"], per_device_train_batch_size=cfg["batch_size"],
        learning_rate=cfg["full_lr"] if full else cfg["lr"], lr_scheduler_type="constant", warmup_steps=0,
        save_strategy="no", report_to=[], logging_strategy="no", use_cpu=cfg["device"].type == "cpu",
        bf16=cfg["device"].type == "cuda" and cfg["dtype"] == "bfloat16", seed=0, data_seed=0,
        disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.0,
    )
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its final metrics dict
        HFTrainer(model=model, args=args, train_dataset=plain_dataset(tokenizer, train_items, cfg["pad_to"])).train()
    if full:
        model.eval()
        return model
    model.save_pretrained(out_dir)
    return out_dir


def loss_of(model, examples, pad_id):
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(list(examples), 8, shuffle=False, pad_token_id=pad_id):
            s, k = loss_sum(model, batch)
            total, n = total + float(s), n + k
    return total / max(n, 1)


def peft_weights(folder):
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return AdapterWeights.from_peft(load_file(str(Path(folder) / "adapter_model.safetensors")), config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 epoch: checks the script runs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--random-base", type=Path, metavar="ARCH",
                        help="random weights of ARCH's architecture (serve_engine.py --save-arch) instead of the "
                             "embedded base: times hold, losses are meaningless")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    add_placement_options(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = placement(args, training=True)
    note = (" (QUICK: tiny random model, numbers meaningless)" if args.quick else
            " (RANDOM WEIGHTS of the base's architecture: times only, losses meaningless)" if args.random_base else "")
    header("persona update benchmark" + note)
    print(f"{device_line(device)}, persona's base in {dtype}\n")

    with workspace("update", args.quick) as (work, base_id):
        if args.random_base and not args.quick:
            base_id = make_random_base(args.random_base, work / "random-base")
        run(work, base_id, 1 if args.quick else args.epochs, 48 if args.quick else 128, device, dtype)


def run(work: Path, base_id: str, epochs: int, pad_to: int, device=None, dtype: str = "float32") -> None:
    device = device if device is not None else torch.device("cpu")
    seed = 0
    update_cfg = UpdateConfig(epochs=epochs, holdout_fraction=0.15, seed=seed)
    data = [read_interactions(EXAMPLES / f) for f in FILES]
    splits = [split_holdout(d, update_cfg.holdout_fraction, seed) for d in data]

    # ---- persona: base loaded once, three updates
    t0 = time.perf_counter()
    base = load_base(base_id, device=device, dtype=dtype, training=True)
    store = Store.init(work / "store", base=base_id)
    store.create("user:alice", LoraSettings(rank=8, alpha=16))
    trainer = Trainer(store, base)
    probe = base.tokenizer("The capital of France is", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        base_logits_before = base.model(probe).logits.clone()
    persona_versions, gates = persona_updates(trainer, "user:alice", data, update_cfg)
    persona_seconds = time.perf_counter() - t0

    # ---- the same without replay (forgetting only)
    store.create("user:alice-noreplay", LoraSettings(rank=8, alpha=16))
    noreplay_versions, noreplay_gates = persona_updates(trainer, "user:alice-noreplay", data,
                                                        dataclasses.replace(update_cfg, replay_fraction=0.0))
    with torch.no_grad():
        drift = float((base.model(probe).logits - base_logits_before).abs().max())
    fp_same = fingerprint(Path(base.info.path)) == store.config.base_fingerprint

    held = [trainer.tokenize(h, 512).examples for _, h in splits]
    pad_id = trainer.pad_id

    def persona_loss(version, k, name="user:alice"):
        loaded = store.load(f"{name}@v{version}")
        return trainer.loss(held[k], AdapterWeights.from_peft(loaded.tensors, loaded.config))[0]

    # ---- plain Trainer + PEFT LoRA, model reloaded for every update, fixed-length padding
    settings = store.version_info("user:alice@v1").lora
    cfg = {"rank": 8, "alpha": 16, "targets": list(settings["target_modules"]), "epochs": epochs, "batch_size": 8,
           "lr": update_cfg.learning_rate, "full_lr": 5e-5, "pad_to": pad_to, "device": device, "dtype": dtype}
    base_dir = base.info.path
    t0 = time.perf_counter()
    previous, plain_dirs = None, []
    for k, (train_items, _) in enumerate(splits):
        previous = plain_update(base_dir, previous, work / f"plain-{k}", train_items, cfg)
        plain_dirs.append(previous)
    plain_seconds = time.perf_counter() - t0

    def plain_loss(k_version, k):
        return trainer.loss(held[k], peft_weights(plain_dirs[k_version]))[0]

    # ---- plain full fine-tuning, sequential (forgetting only)
    full_model = None
    full_losses = {}
    for k, (train_items, _) in enumerate(splits):
        full_model = plain_update(base_dir, None, work / f"full-{k}", train_items, cfg, full=True, model=full_model)
        full_losses[k] = {j: loss_of(full_model, held[j], pad_id) for j in range(len(data))}
    del full_model

    # ---- results
    before1 = trainer.loss(held[0], None)[0]
    p_after1, p_after3 = persona_loss(persona_versions[0], 0), persona_loss(persona_versions[-1], 0)
    c_after1, c_after3 = plain_loss(0, 0), plain_loss(2, 0)
    f_after1, f_after3 = full_losses[0][0], full_losses[2][0]
    n_after1 = persona_loss(noreplay_versions[0], 0, "user:alice-noreplay")
    n_after3 = persona_loss(noreplay_versions[-1], 0, "user:alice-noreplay")
    p_rise, c_rise, f_rise, n_rise = p_after3 - p_after1, c_after3 - c_after1, f_after3 - f_after1, n_after3 - n_after1

    print("## Speed and quality (three sequential updates)\n")
    rows = []
    for k in range(len(data)):
        rows.append([f"update {k + 1} ({FILES[k]}) held-out loss", persona_loss(persona_versions[k], k), plain_loss(k, k),
                     persona_loss(persona_versions[k], k) / plain_loss(k, k)])
    print(table(["", "persona", "plain Trainer+PEFT", "ratio (lower is better)"], [
        ["wall time of 3 updates (s)", persona_seconds, plain_seconds, persona_seconds / plain_seconds],
        *rows,
    ]))
    mean_ratio = sum(r[3] for r in rows) / len(rows)
    print(f"\npersona speed-up: {plain_seconds / persona_seconds:.2f}x (goal >= 2x); mean held-out loss ratio "
          f"{mean_ratio:.3f} (goal <= 1); gate decisions: {', '.join(gates)}")
    print(f"plain pads every example to {pad_to} tokens and reloads the model per update; persona loads the base once.\n")

    def vs_plain(rise):
        return rise / c_rise if c_rise > 0 else math.nan

    print("## Forgetting: loss on update 1's held-out data (base alone: %.4f)\n" % before1)
    print(table(["method", "after update 1", "after update 3", "rise", "rise vs plain LoRA"], [
        [f"persona (replay {update_cfg.replay_fraction:g}, reg {update_cfg.reg})", p_after1, p_after3, p_rise, vs_plain(p_rise)],
        [f"persona, no replay (gate: {', '.join(noreplay_gates)})", n_after1, n_after3, n_rise, vs_plain(n_rise)],
        ["plain sequential LoRA", c_after1, c_after3, c_rise, 1.0],
        ["plain sequential full FT", f_after1, f_after3, f_rise, vs_plain(f_rise)],
    ]))
    print("\ngoal: persona's rise <= 0.5 x plain LoRA's\n")
    print("## Base drift\n")
    print(table(["check", "value"], [["max |logit diff| of the base, before vs after 3 updates", drift],
                                      ["fingerprint unchanged", fp_same]]))


if __name__ == "__main__":
    main()
