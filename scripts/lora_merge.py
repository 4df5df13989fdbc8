"""Merge a LoRA adapter into its base model and save the result as a normal checkpoint, which every other script loads.
    python -m scripts.lora_merge --lora-dir $NANOCHAT_BASE_DIR/chatsft_checkpoints/d12_lora [--out-dir DIR] [--force]"""
import argparse
import os

import torch

from nanochat.checkpoint_manager import SOURCES, build_model, delete_checkpoint, list_steps, save_checkpoint
from nanochat.common import HelpFormatter, get_base_dir
from nanochat.lora import lora_state_dict, merge_lora

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--lora-dir", required=True, help="checkpoint folder of the adapters (e.g. .../chatsft_checkpoints/d12_lora)")
    parser.add_argument("--step", type=int, default=None, help="adapter step to merge (None: the latest)")
    parser.add_argument("--out-dir", default=None, help="checkpoint folder to write (overrides --out-source/--model-tag)")
    parser.add_argument("--out-source", default=None, choices=list(SOURCES),
                        help="write under this stage's checkpoint folder (None: the adapter's 'stage', else its base's source)")
    parser.add_argument("--model-tag", default=None, help="model tag of the merged checkpoint (None: <adapter folder>_merged)")
    parser.add_argument("--force", action="store_true", help="replace the checkpoints already in the output folder")
    parser.add_argument("--device", default="cpu", help="device to merge on")
    args = parser.parse_args(argv)
    # the adapter model, unmerged, as the reference for the check below; its meta names the base
    # model ({"base": {"source", "model_tag", "step"}}), which build_model rebuilds first
    model, _, meta = build_model(args.lora_dir, args.step, args.device, "eval", merge=False)
    source = None  # stays None for an --out-dir of the user's: no -i/--model-tag to tell then
    if args.out_dir is None:  # beside the stage's own checkpoints, so `-i <stage> --model-tag <tag>` loads it
        # the stage that trained the adapter (SFT adapters among the SFT checkpoints), else the base's
        source = args.out_source or (meta.get("stage") if meta.get("stage") in SOURCES else meta["base"]["source"])
        # named after the adapter, not its base: merging two adapters of one base must give two models
        tag = args.model_tag or f"{os.path.basename(os.path.normpath(args.lora_dir))}_merged"
        args.out_dir = os.path.join(get_base_dir(), SOURCES[source][0], tag)
    # another merge's steps in the folder would mix with this one's, and loading takes the newest step
    if list_steps(args.out_dir) and not args.force:
        raise SystemExit(f"error: {args.out_dir} already holds a checkpoint; pass --force to replace it")
    # W + (alpha / rank) * B @ A must give the adapter model's logits (up to rounding) on a fixed random probe
    probe = torch.randint(0, model.config.vocab_size, (2, min(64, model.config.sequence_len)),
                          generator=torch.Generator().manual_seed(0)).to(args.device)
    with torch.no_grad():
        before = model(probe)
        n_adapter = sum(t.numel() for t in lora_state_dict(model).values())
        merge_lora(model)
        diff = (before - model(probe)).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"merged logits differ from the adapter model's by {diff:.2e}: not saving")
    # a plain checkpoint: no "lora" in its meta (so nothing loads it as an adapter), but where it came from
    out_meta = dict({k: v for k, v in meta.items() if k != "lora"}, model_config=dict(vars(model.config)),
                    merged_lora={"lora_dir": os.path.abspath(args.lora_dir), "step": meta["step"], **meta["lora"]})
    for old_step in list_steps(args.out_dir):  # --force: the folder then holds this merge alone
        delete_checkpoint(args.out_dir, old_step)
    # no optimizer state: the merged model starts a new run, not this one's resume
    save_checkpoint(args.out_dir, meta["step"], {k: v.detach() for k, v in model.state_dict().items()}, None, out_meta)
    print(f"merged {n_adapter:,} adapter parameters into {meta['base']} (max logit change check {diff:.1e}); "
          f"wrote {args.out_dir} step {meta['step']}"
          + (f"; load it with `-i {source} --model-tag {tag}`, e.g. python -m scripts.chat_cli" if source else ""))
    return args.out_dir

if __name__ == "__main__":
    main()
