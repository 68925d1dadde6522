"""Convert an original-layout InternVL3 checkpoint folder into a native-layout copy, which later runs load directly.

    python tools/convert.py SRC DST

The conversion itself is `internvl.load_internvl` (see internvl.py); this file only writes its result.
"""

import argparse
from pathlib import Path

from models.internvl import is_original_layout, load_internvl, load_tokenizer
from utils import UserError, entry_point


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Convert an original-layout InternVL3 folder into a native-layout copy (`python tools/convert.py SRC DST`).

    The copy holds the native config and safetensors weights from `save_pretrained` plus the tokenizer,
    so `load_internvl(DST)` (or `from_pretrained`) reads it without converting again.
    """
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("src", help="folder with the original (internvl_chat) checkpoint")
    parser.add_argument("dst", help="new folder for the native (internvl) copy")
    args = parser.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if not is_original_layout(src):
        raise UserError(f"{src}: already in the native layout; load it directly")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst}: exists and is not empty; choose a new folder")
    model = load_internvl(str(src))
    model.save_pretrained(dst)
    load_tokenizer(src).save_pretrained(dst)
    config = model.config
    print(
        f"converted {src} (internvl_chat) -> {dst} (internvl, InternVLForConditionalGeneration): "
        f"{sum(p.numel() for p in model.parameters()):,} parameters in {model.dtype}, "
        f"{'tied' if config.tie_word_embeddings else 'separate'} lm_head, image_token_id {config.image_token_id}, "
        f"{config.image_seq_length} tokens per tile; tokenizer copied"
    )


if __name__ == "__main__":
    main()
