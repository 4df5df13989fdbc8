"""
Merge a LoRA adapter into its base model and save the result as a normal checkpoint, which every other script loads.
    python -m scripts.lora_merge --lora-dir $NANOCHAT_BASE_DIR/chatsft_checkpoints/d12_lora [--out-dir DIR]
"""
import argparse
import os

import torch

from nanochat.checkpoint_manager import SOURCES, build_model, save_checkpoint
from nanochat.common import get_base_dir
from nanochat.lora import lora_state_dict, merge_lora

def main(argv=None):
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model (writes a normal checkpoint).")
    parser.add_argument("--lora-dir", required=True, help="checkpoint folder of the adapters (e.g. .../chatsft_checkpoints/d12_lora)")
    parser.add_argument("--step", type=int, default=None, help="adapter step to merge (default: the latest)")
    parser.add_argument("--out-dir", default=None, help="checkpoint folder to write (overrides --out-source/--model-tag)")
    parser.add_argument("--out-source", default=None, choices=list(SOURCES),
                        help="write under this stage's checkpoint folder (default: the adapter's 'stage', else its base source)")
    parser.add_argument("--model-tag", default=None, help="model tag of the merged checkpoint (default: <base tag>_merged)")
    parser.add_argument("--device", default="cpu", help="device to merge on")
    args = parser.parse_args(argv)
    # the adapter model, unmerged, as the reference for the check below; its meta names the base
    # model ({"base": {"source", "model_tag", "step"}}), which build_model rebuilds first
    model, _, meta = build_model(args.lora_dir, args.step, args.device, "eval", merge=False)
    if args.out_dir is None:  # beside the stage's own checkpoints, so `-i <stage> --model-tag <tag>` loads it
        # the stage that trained the adapter (SFT adapters among the SFT checkpoints), else the base's
        source = args.out_source or (meta.get("stage") if meta.get("stage") in SOURCES else meta["base"]["source"])
        tag = args.model_tag or f"{meta['base'].get('model_tag') or 'model'}_merged"
        args.out_dir = os.path.join(get_base_dir(), SOURCES[source][0], tag)
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
    # no optimizer state: the merged model starts a new run, not this one's resume
    save_checkpoint(args.out_dir, meta["step"], {k: v.detach() for k, v in model.state_dict().items()}, None, out_meta)
    print(f"merged {n_adapter:,} adapter parameters into {meta['base']} (max logit change check {diff:.1e}); "
          f"wrote {args.out_dir} step {meta['step']}")
    return args.out_dir

if __name__ == "__main__":
    main()
