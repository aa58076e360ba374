"""Command-line groups that two or more stages share: one definition, one meaning, one validation rule each."""


def add_model_arguments(group) -> None:
    """The model flags steps 1 and 2 share (an argparse group)."""
    group.add_argument("--min-pixels", type=int, default=3136, help="image size floor (pixels) for the processor")
    group.add_argument("--max-pixels", type=int, default=1003520, help="image size cap (pixels) for the processor")
    group.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    group.add_argument("--attn-implementation", default="auto",
                       help="auto: flash_attention_2 on CUDA when flash_attn imports, else sdpa; or any name "
                            "transformers knows (sdpa, eager, flash_attention_2)")
    group.add_argument("--gradient-checkpointing", action="store_true")
    group.add_argument("--freeze-vision-tower", action="store_true")
