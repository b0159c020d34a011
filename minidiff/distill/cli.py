"""`minidiff distill blocks|lcm-lora`: the distillation trainers from the command line.

    minidiff distill blocks --teacher minidiff/assets/shapes-sd --arch bk-sdm-small --data shapes \
        --steps 800 --out small-sd
    torchrun --nproc_per_node 2 -m minidiff distill blocks ...     # the same run, data-parallel

`lcm-lora` comes from minidiff/distill/lcm_lora.py (its `add_arguments(parser)` and `run(args)`).
"""
import importlib.util


def add_distill(sub):
    """The `distill` command group on the main parser's subparsers."""
    d = sub.add_parser("distill", help="train smaller or faster students of a pipeline (BK-SDM, LCM-LoRA)")
    verbs = d.add_subparsers(dest="verb", required=True)
    add_blocks(verbs.add_parser(
        "blocks", help="block-removal distillation: BK-SDM / Segmind SD-Small and SD-Tiny students",
        description="Remove UNet blocks (BK-SDM's base/small/tiny, Segmind's sd_small/sd_tiny, or a custom list), "
                    "initialise the student from the teacher and train it with task + output + feature losses. "
                    "Writes a whole pipeline folder (Hub layout) with the student UNet."))
    if importlib.util.find_spec("minidiff.distill.lcm_lora") is not None:
        from . import lcm_lora
        lcm_lora.add_arguments(verbs.add_parser("lcm-lora", help="latent consistency distillation into a LoRA"))


def add_blocks(p):
    from .surgery import ARCHS
    p.add_argument("--teacher", required=True, help="the teacher: a local pipeline folder (Hub layout)")
    p.add_argument("--arch", default=None, choices=list(ARCHS), help="which blocks go, as the papers name the students")
    p.add_argument("--drop", nargs="+", default=[], metavar="BLOCKS",
                   help="removals instead of (or added to) --arch: pairs, pairs.N, mid_block, inner_stage")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (the bundled model's world), a folder of images with .txt captions, or a "
                        "prompts file (one a line; the teacher draws the images)")
    p.add_argument("--images", type=int, default=2000, help="pictures drawn for --data shapes")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="the global batch (split over torchrun's processes)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("TASK", "OUTPUT", "FEATURE"),
                   help="loss weights (default 1 1 1, as BK-SDM)")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty captions (keeps guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (out/distill-state/)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--fp16", action="store_true", help="store the student's weights in float16")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--out", required=True, help="the student's pipeline folder")


def run_distill(a):
    if a.verb == "lcm-lora":
        from . import lcm_lora
        return lcm_lora.run(a)
    import torch
    from .blocks import distill
    if a.arch is None and not a.drop:
        raise SystemExit("minidiff distill blocks: give --arch (bk-sdm-base, bk-sdm-small, bk-sdm-tiny, sd_small, "
                         "sd_tiny) or --drop")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        distill(a.teacher, a.out, arch=a.arch, drop=tuple(a.drop), data=a.data, steps=a.steps, batch=a.batch,
                lr=a.lr, weights=tuple(a.weights), seed=a.seed, cfg_dropout=a.cfg_dropout, n_images=a.images,
                resume=a.resume, save_every=a.save_every, fp16=a.fp16)
    except (ValueError, KeyError, OSError) as e:
        raise SystemExit(f"minidiff distill blocks: {' '.join(str(e).split())}") from None
    finally:
        from .parallel import cleanup
        cleanup()
